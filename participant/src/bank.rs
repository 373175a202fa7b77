//! The sample service: a bank whose accounts take part in transfers.
//!
//! One tree, `bank.accounts`, maps an account name to its [`Account`]: money `available` to
//! spend and money `held` by prepared debits. A transfer is two branches: a debit at the
//! payer's bank and a credit at the payee's (the two may be different processes).
//!
//! - prepare debit: votes NO if the account is unknown or `available < amount`; otherwise
//!   moves the amount from `available` to `held`, so it cannot be spent twice;
//! - commit debit: drops the hold; abort debit: returns the hold to `available`;
//! - prepare credit: votes NO if the account is unknown; holds nothing;
//! - commit credit: adds to `available`; abort credit: nothing.
//!
//! The committed balance of an account is `available + held` (a prepared debit is not yet
//! committed); [`balances`] reports that.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tandem_common::codec;

use crate::client::Branch;
use crate::error::Error;
use crate::participant::Participant;
use crate::resource::{BranchContext, ResourceError, ServiceTrees, TwoPhaseResource, Vote};

/// The resource name the bank registers under.
pub const RESOURCE: &str = "bank";
/// The tree holding the accounts.
pub const ACCOUNTS_TREE: &str = "bank.accounts";
/// Largest amount one operation may move (keeps every sum far from overflow).
pub const AMOUNT_MAX: i64 = 1_000_000_000_000;
/// Longest account name.
pub const ACCOUNT_NAME_LEN_MAX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub available: i64,
    pub held: i64,
}

/// A branch's payload (JSON): `{"op":"debit","account":"alice","amount":10}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum BankOp {
    Debit { account: String, amount: i64 },
    Credit { account: String, amount: i64 },
}

impl BankOp {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a BankOp always serialises")
    }

    fn decode(payload: &[u8]) -> Result<Self, String> {
        let op: BankOp =
            serde_json::from_slice(payload).map_err(|e| format!("malformed bank payload: {e}"))?;
        let (BankOp::Debit { account, amount } | BankOp::Credit { account, amount }) = &op;
        validate_account_name(account)?;
        if *amount <= 0 || *amount > AMOUNT_MAX {
            return Err(format!("amount {amount} is out of range 1..={AMOUNT_MAX}"));
        }
        Ok(op)
    }
}

pub fn validate_account_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= ACCOUNT_NAME_LEN_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "account name {name:?} must be 1 to {ACCOUNT_NAME_LEN_MAX} of [A-Za-z0-9_.-]"
        ))
    }
}

/// The bank as a two-phase resource.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bank;

fn read_account(trees: &ServiceTrees<'_>, name: &str) -> Result<Option<Account>, ResourceError> {
    match trees.tree(ACCOUNTS_TREE).get(name)? {
        Some(bytes) => codec::decode(&bytes)
            .map(Some)
            .map_err(|e| ResourceError::Failed(format!("account {name:?} is unreadable: {e}"))),
        None => Ok(None),
    }
}

fn write_account(
    trees: &ServiceTrees<'_>,
    name: &str,
    account: Account,
) -> Result<(), ResourceError> {
    debug_assert!(
        account.available >= 0 && account.held >= 0,
        "{name}: negative money {account:?}"
    );
    let bytes = codec::encode(&account).map_err(|e| ResourceError::Failed(e.to_string()))?;
    trees.tree(ACCOUNTS_TREE).insert(name, bytes)?;
    Ok(())
}

/// Reads an account that prepare proved exists; its absence now is a broken invariant.
fn prepared_account(trees: &ServiceTrees<'_>, name: &str) -> Result<Account, ResourceError> {
    read_account(trees, name)?
        .ok_or_else(|| ResourceError::Failed(format!("account {name:?} vanished after prepare")))
}

impl TwoPhaseResource for Bank {
    fn trees(&self) -> Vec<String> {
        vec![ACCOUNTS_TREE.to_string()]
    }

    fn prepare(
        &self,
        _ctx: &BranchContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<Vote, ResourceError> {
        let op = match BankOp::decode(payload) {
            Ok(op) => op,
            Err(reason) => return Ok(Vote::No { reason }),
        };
        match op {
            BankOp::Debit { account, amount } => match read_account(trees, &account)? {
                None => Ok(Vote::No {
                    reason: format!("no account {account:?}"),
                }),
                Some(a) if a.available < amount => Ok(Vote::No {
                    reason: format!(
                        "insufficient funds in {account:?}: {} available, {amount} asked",
                        a.available
                    ),
                }),
                Some(a) => {
                    write_account(
                        trees,
                        &account,
                        Account {
                            available: a.available - amount,
                            held: a.held + amount,
                        },
                    )?;
                    Ok(Vote::Yes)
                }
            },
            BankOp::Credit { account, amount } => match read_account(trees, &account)? {
                None => Ok(Vote::No {
                    reason: format!("no account {account:?}"),
                }),
                Some(a)
                    if a.available
                        .checked_add(amount)
                        .is_none_or(|sum| sum > i64::MAX / 2) =>
                {
                    Ok(Vote::No {
                        reason: format!("account {account:?} would overflow"),
                    })
                }
                Some(_) => Ok(Vote::Yes),
            },
        }
    }

    fn commit(
        &self,
        _ctx: &BranchContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<(), ResourceError> {
        match BankOp::decode(payload).map_err(ResourceError::Failed)? {
            BankOp::Debit { account, amount } => {
                let a = prepared_account(trees, &account)?;
                assert!(
                    a.held >= amount,
                    "{account}: commit of a debit of {amount} but only {} held",
                    a.held
                );
                write_account(
                    trees,
                    &account,
                    Account {
                        available: a.available,
                        held: a.held - amount,
                    },
                )
            }
            BankOp::Credit { account, amount } => {
                let a = prepared_account(trees, &account)?;
                write_account(
                    trees,
                    &account,
                    Account {
                        available: a.available + amount,
                        held: a.held,
                    },
                )
            }
        }
    }

    fn abort(
        &self,
        _ctx: &BranchContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<(), ResourceError> {
        match BankOp::decode(payload).map_err(ResourceError::Failed)? {
            BankOp::Debit { account, amount } => {
                let a = prepared_account(trees, &account)?;
                assert!(
                    a.held >= amount,
                    "{account}: abort of a debit of {amount} but only {} held",
                    a.held
                );
                write_account(
                    trees,
                    &account,
                    Account {
                        available: a.available + amount,
                        held: a.held - amount,
                    },
                )
            }
            BankOp::Credit { .. } => Ok(()),
        }
    }
}

/// Opens a bank participant in `dir`.
pub fn open(dir: &Path) -> Result<Participant, Error> {
    Participant::builder(dir).resource(RESOURCE, Bank).open()
}

/// Creates the accounts that do not exist yet with the given balances (existing data wins),
/// durably. Returns the names it created.
pub async fn ensure_accounts(
    participant: &Participant,
    accounts: &[(String, i64)],
) -> Result<Vec<String>, Error> {
    let tree = participant.db().open_tree(ACCOUNTS_TREE)?;
    let mut created = Vec::new();
    for (name, balance) in accounts {
        validate_account_name(name).map_err(Error::InvalidArgument)?;
        let bytes = codec::encode(&Account {
            available: *balance,
            held: 0,
        })?;
        if tree
            .compare_and_swap(name.as_str(), None as Option<&[u8]>, Some(bytes))?
            .is_ok()
        {
            created.push(name.clone());
        }
    }
    participant.flush().await?;
    Ok(created)
}

/// Parses `alice=100,bob=50`.
pub fn parse_accounts(spec: &str) -> Result<Vec<(String, i64)>, String> {
    let mut accounts = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, balance) = part
            .split_once('=')
            .ok_or_else(|| format!("account {part:?} is not of the form name=balance"))?;
        validate_account_name(name)?;
        let balance: i64 = balance
            .parse()
            .map_err(|_| format!("balance of {name:?} is not a whole number: {balance:?}"))?;
        if !(0..=AMOUNT_MAX).contains(&balance) {
            return Err(format!("balance of {name:?} must be in 0..={AMOUNT_MAX}"));
        }
        if accounts.iter().any(|(n, _)| n == name) {
            return Err(format!("account {name:?} is given twice"));
        }
        accounts.push((name.to_string(), balance));
    }
    Ok(accounts)
}

/// Every account's committed balance (`available + held`), by name.
pub fn balances(db: &sled::Db) -> Result<BTreeMap<String, i64>, Error> {
    Ok(accounts(db)?
        .into_iter()
        .map(|(name, a)| (name, a.available + a.held))
        .collect())
}

/// Every account, by name.
pub fn accounts(db: &sled::Db) -> Result<BTreeMap<String, Account>, Error> {
    let tree = db.open_tree(ACCOUNTS_TREE)?;
    let mut accounts = BTreeMap::new();
    for entry in tree.iter() {
        let (key, value) = entry?;
        accounts.insert(
            String::from_utf8_lossy(&key).into_owned(),
            codec::decode::<Account>(&value)?,
        );
    }
    Ok(accounts)
}

/// Reads the balances of a stopped bank from its data folder.
pub fn balances_in(dir: &Path) -> Result<BTreeMap<String, i64>, Error> {
    if !dir.join("db").exists() {
        return Err(Error::InvalidArgument(format!(
            "{} holds no bank data",
            dir.display()
        )));
    }
    let db = sled::Config::new().path(dir).open().map_err(|e| {
        Error::Storage(format!(
            "cannot open {} (is the bank still running?): {e}",
            dir.display()
        ))
    })?;
    balances(&db)
}

/// The two branches of a transfer of `amount` from `from` to `to` (each `(bank address, account)`).
pub fn transfer_branches(from: (&str, &str), to: (&str, &str), amount: i64) -> Vec<Branch> {
    vec![
        Branch::new(
            from.0,
            RESOURCE,
            BankOp::Debit {
                account: from.1.to_string(),
                amount,
            }
            .encode(),
        ),
        Branch::new(
            to.0,
            RESOURCE,
            BankOp::Credit {
                account: to.1.to_string(),
                amount,
            }
            .encode(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::Vote;
    use tandem_common::{BranchIdx, TxnId};

    fn ctx(n: u32) -> BranchContext {
        BranchContext {
            txn: TxnId::parse(&format!("1763850000000-bank{n}")).unwrap(),
            branch: BranchIdx(0),
            resource: RESOURCE.into(),
        }
    }

    #[tokio::test]
    async fn a_prepared_debit_holds_the_money_until_commit_or_abort() {
        let dir = tempfile::tempdir().unwrap();
        let bank = open(dir.path()).unwrap();
        ensure_accounts(&bank, &[("alice".into(), 100)])
            .await
            .unwrap();
        let debit = |n: i64| {
            BankOp::Debit {
                account: "alice".into(),
                amount: 60 + n,
            }
            .encode()
        };
        assert_eq!(
            bank.prepare(&ctx(1), &debit(0), "http://c:1")
                .await
                .unwrap(),
            Vote::Yes
        );
        // The hold makes a second debit of the same money vote no.
        let second = bank
            .prepare(&ctx(2), &debit(1), "http://c:1")
            .await
            .unwrap();
        assert!(
            matches!(&second, Vote::No { reason } if reason.contains("insufficient funds")),
            "{second:?}"
        );
        assert_eq!(
            accounts(bank.db()).unwrap()["alice"],
            Account {
                available: 40,
                held: 60
            }
        );
        assert_eq!(balances(bank.db()).unwrap()["alice"], 100);
        bank.decide(&ctx(1).txn, BranchIdx(0), RESOURCE, false)
            .await
            .unwrap();
        assert_eq!(
            accounts(bank.db()).unwrap()["alice"],
            Account {
                available: 100,
                held: 0
            }
        );
        assert_eq!(
            bank.prepare(&ctx(3), &debit(0), "http://c:1")
                .await
                .unwrap(),
            Vote::Yes
        );
        bank.decide(&ctx(3).txn, BranchIdx(0), RESOURCE, true)
            .await
            .unwrap();
        assert_eq!(
            accounts(bank.db()).unwrap()["alice"],
            Account {
                available: 40,
                held: 0
            }
        );
    }

    #[tokio::test]
    async fn existing_accounts_win_over_the_initial_balances() {
        let dir = tempfile::tempdir().unwrap();
        let bank = open(dir.path()).unwrap();
        assert_eq!(
            ensure_accounts(&bank, &[("a".into(), 5)]).await.unwrap(),
            vec!["a".to_string()]
        );
        assert_eq!(
            ensure_accounts(&bank, &[("a".into(), 9), ("b".into(), 1)])
                .await
                .unwrap(),
            vec!["b".to_string()]
        );
        assert_eq!(
            balances(bank.db()).unwrap(),
            BTreeMap::from([("a".into(), 5), ("b".into(), 1)])
        );
    }

    #[test]
    fn account_specs_parse_or_name_the_problem() {
        assert_eq!(
            parse_accounts("alice=100, bob=50").unwrap(),
            vec![("alice".into(), 100), ("bob".into(), 50)]
        );
        assert!(parse_accounts("alice")
            .unwrap_err()
            .contains("name=balance"));
        assert!(parse_accounts("alice=x")
            .unwrap_err()
            .contains("whole number"));
        assert!(parse_accounts("alice=-1").unwrap_err().contains("0..="));
        assert!(parse_accounts("a=1,a=2").unwrap_err().contains("twice"));
        assert!(parse_accounts("a b=1")
            .unwrap_err()
            .contains("account name"));
    }
}
