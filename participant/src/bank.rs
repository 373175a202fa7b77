//! The sample service: a bank whose accounts take part in transfers.
//!
//! The tree `bank.accounts` maps an account name to its [`Account`]: money `available` to
//! spend and money `held` by prepared debits. A transfer is two branches: a debit at the
//! payer's bank and a credit at the payee's (the two may be different processes).
//!
//! - prepare debit: votes NO if the account is unknown or `available < amount`; otherwise
//!   moves the amount from `available` to `held`, so it cannot be spent twice;
//! - commit debit: drops the hold; abort debit: returns the hold to `available`;
//! - prepare credit: votes NO if the account is unknown or closed; holds nothing;
//! - commit credit: adds to `available`; abort credit: nothing.
//!
//! The committed balance of an account is `available + held` (a prepared debit is not yet
//! committed); [`balances`] reports that.
//!
//! Saga transfers ([`BankStep`], registered as the saga step [`SAGA_STEP`]) are two steps,
//! each an action and its inverse as the compensation, with the same JSON payloads
//! ([`BankOp`]); sagas have no isolation, so an action changes `available` at once:
//!
//! - action debit: fails (a business failure) if the account is unknown or
//!   `available < amount`; otherwise takes the amount from `available`;
//! - action credit: fails if the account is unknown or closed; otherwise adds to `available`;
//! - compensation (the inverse op: a credit undoes a debit, a debit undoes a credit): never a
//!   business failure. Giving money back always applies. Taking a credit back whose money was
//!   spent meanwhile cannot apply yet: it answers an error, so the coordinator retries it (and
//!   flags the saga stuck) until the money is there; it never drives an account negative.
//!
//! Closed accounts: [`close_accounts`] marks names in the `bank.closed` tree (the [`Account`]
//! record keeps its stored format). A closed account refuses credits (a saga credit fails, a
//! 2PC credit votes NO) and still allows debits and compensations. Crediting a closed or an
//! unknown account is how the samples make a saga compensate.
//!
//! The bank also hosts a saga completion-callback handler ([`CallbackLog`], registered as
//! [`CALLBACK`]) that records every outcome it receives in `bank.saga_callbacks`, with how many
//! times it was called (the SDK makes that once); [`saga_callbacks`] and
//! [`saga_callbacks_in`] read them back.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tandem_common::{codec, unix_now_ms, TxnId};

use crate::client::{Branch, Saga, Step};
use crate::error::Error;
use crate::participant::Participant;
use crate::resource::{BranchContext, ResourceError, ServiceTrees, TwoPhaseResource, Vote};
use crate::saga::{
    bounded_reason, CompensableResource, SagaCallbackHandler, StepContext, StepOutcome,
};
use crate::saga_state::SagaState;

/// The resource name the bank registers under.
pub const RESOURCE: &str = "bank";
/// The saga step name the bank registers under (the `resource` of a saga step). The same
/// name as the 2PC resource, not the default "": a saga step must name it.
pub const SAGA_STEP: &str = "bank";
/// The saga callback handler name the bank registers under.
pub const CALLBACK: &str = "bank";
/// The tree holding the accounts.
pub const ACCOUNTS_TREE: &str = "bank.accounts";
/// The tree naming closed accounts (key: the account's name; value: empty).
pub const CLOSED_TREE: &str = "bank.closed";
/// The tree of saga outcomes received by the callback handler (key: the saga id).
pub const SAGA_CALLBACKS_TREE: &str = "bank.saga_callbacks";
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

fn is_closed(trees: &ServiceTrees<'_>, name: &str) -> Result<bool, ResourceError> {
    Ok(trees.tree(CLOSED_TREE).get(name)?.is_some())
}

/// Whether adding `amount` to `available` would leave the safe range.
fn would_overflow(available: i64, amount: i64) -> bool {
    available
        .checked_add(amount)
        .is_none_or(|sum| sum > i64::MAX / 2)
}

/// Reads an account that prepare proved exists; its absence now is a broken invariant.
fn prepared_account(trees: &ServiceTrees<'_>, name: &str) -> Result<Account, ResourceError> {
    read_account(trees, name)?
        .ok_or_else(|| ResourceError::Failed(format!("account {name:?} vanished after prepare")))
}

impl TwoPhaseResource for Bank {
    fn trees(&self) -> Vec<String> {
        vec![ACCOUNTS_TREE.to_string(), CLOSED_TREE.to_string()]
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
                Some(_) if is_closed(trees, &account)? => Ok(Vote::No {
                    reason: format!("account {account:?} is closed"),
                }),
                Some(a) if would_overflow(a.available, amount) => Ok(Vote::No {
                    reason: format!("account {account:?} would overflow"),
                }),
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

/// The bank as a saga step: actions change `available` at once, compensations are the
/// inverse ops (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct BankStep;

impl CompensableResource for BankStep {
    fn trees(&self) -> Vec<String> {
        vec![ACCOUNTS_TREE.to_string(), CLOSED_TREE.to_string()]
    }

    fn action(
        &self,
        _ctx: &StepContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<StepOutcome, ResourceError> {
        let op = match BankOp::decode(payload) {
            Ok(op) => op,
            Err(reason) => return Ok(StepOutcome::Failed { reason }),
        };
        let failed = |reason: String| Ok(StepOutcome::Failed { reason });
        match op {
            BankOp::Debit { account, amount } => match read_account(trees, &account)? {
                None => failed(format!("no account {account:?}")),
                Some(a) if a.available < amount => failed(format!(
                    "insufficient funds in {account:?}: {} available, {amount} asked",
                    a.available
                )),
                Some(a) => {
                    let available = a.available - amount;
                    write_account(trees, &account, Account { available, ..a })?;
                    Ok(StepOutcome::Succeeded)
                }
            },
            BankOp::Credit { account, amount } => match read_account(trees, &account)? {
                None => failed(format!("no account {account:?}")),
                Some(_) if is_closed(trees, &account)? => {
                    failed(format!("account {account:?} is closed"))
                }
                Some(a) if would_overflow(a.available, amount) => {
                    failed(format!("account {account:?} would overflow"))
                }
                Some(a) => {
                    let available = a.available + amount;
                    write_account(trees, &account, Account { available, ..a })?;
                    Ok(StepOutcome::Succeeded)
                }
            },
        }
    }

    fn compensate(
        &self,
        _ctx: &StepContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<(), ResourceError> {
        // Runs only after this step's action succeeded (the saga barrier), so the account
        // exists; a malformed compensation payload is the submitter's bug.
        match BankOp::decode(payload).map_err(ResourceError::Failed)? {
            BankOp::Credit { account, amount } => {
                let a = read_account(trees, &account)?.ok_or_else(|| {
                    ResourceError::Failed(format!("account {account:?} vanished after a debit"))
                })?;
                if would_overflow(a.available, amount) {
                    return Err(ResourceError::Failed(format!(
                        "giving {amount} back to {account:?} would overflow"
                    )));
                }
                let available = a.available + amount;
                write_account(trees, &account, Account { available, ..a })
            }
            BankOp::Debit { account, amount } => {
                let a = read_account(trees, &account)?.ok_or_else(|| {
                    ResourceError::Failed(format!("account {account:?} vanished after a credit"))
                })?;
                if a.available < amount {
                    return Err(ResourceError::Failed(format!(
                        "cannot take {amount} back from {account:?} yet: {} available \
                         (the compensation is retried until the money is there)",
                        a.available
                    )));
                }
                let available = a.available - amount;
                write_account(trees, &account, Account { available, ..a })
            }
        }
    }
}

/// A saga outcome as the bank's callback handler recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedCallback {
    /// How many times the handler was called for this saga: 1, since the SDK delivers each
    /// callback to its handler once (more would be a bug the tests look for).
    pub calls: u32,
    /// When the handler was first called, in ms since the Unix epoch.
    pub received_ms: u64,
    /// The saga's final state, its texts cut to [`crate::saga::REASON_BYTES_MAX`] bytes each.
    pub outcome: SagaState,
}

/// The bank's saga completion-callback handler: records every outcome in
/// [`SAGA_CALLBACKS_TREE`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CallbackLog;

impl SagaCallbackHandler for CallbackLog {
    fn trees(&self) -> Vec<String> {
        vec![SAGA_CALLBACKS_TREE.to_string()]
    }

    fn on_finished(
        &self,
        saga: &TxnId,
        outcome: &SagaState,
        trees: &ServiceTrees<'_>,
    ) -> Result<(), ResourceError> {
        let log = trees.tree(SAGA_CALLBACKS_TREE);
        let decode = |bytes: &[u8]| {
            codec::decode::<ReceivedCallback>(bytes).map_err(|e| {
                ResourceError::Failed(format!("callback record of {saga} is unreadable: {e}"))
            })
        };
        let record = match log.get(saga.as_str())? {
            Some(bytes) => {
                let earlier = decode(&bytes)?;
                tracing::error!(saga = %saga, calls = earlier.calls + 1, "saga callback handled more than once");
                ReceivedCallback {
                    calls: earlier.calls + 1,
                    ..earlier
                }
            }
            None => {
                let mut outcome = outcome.clone();
                outcome.failed_step = bounded_reason(outcome.failed_step);
                outcome.reason = bounded_reason(outcome.reason);
                for step in &mut outcome.steps {
                    step.name = bounded_reason(std::mem::take(&mut step.name));
                    step.last_error = bounded_reason(std::mem::take(&mut step.last_error));
                }
                ReceivedCallback {
                    calls: 1,
                    received_ms: unix_now_ms(),
                    outcome,
                }
            }
        };
        let bytes = codec::encode(&record).map_err(|e| ResourceError::Failed(e.to_string()))?;
        log.insert(saga.as_str(), bytes)?;
        Ok(())
    }
}

/// Opens a bank participant in `dir`: the 2PC resource [`RESOURCE`], the saga step
/// [`SAGA_STEP`] and the saga callback handler [`CALLBACK`].
pub fn open(dir: &Path) -> Result<Participant, Error> {
    builder(dir).open()
}

/// The bank's participant, not yet opened (to set its configuration).
pub fn builder(dir: &Path) -> crate::participant::ParticipantBuilder {
    Participant::builder(dir)
        .resource(RESOURCE, Bank)
        .saga_step(SAGA_STEP, BankStep)
        .saga_callback(CALLBACK, CallbackLog)
}

/// Marks the named accounts closed (they refuse credits from then on), durably.
pub async fn close_accounts(participant: &Participant, names: &[String]) -> Result<(), Error> {
    let tree = participant.db().open_tree(CLOSED_TREE)?;
    for name in names {
        validate_account_name(name).map_err(Error::InvalidArgument)?;
        tree.insert(name.as_str(), &[])?;
    }
    participant.flush().await?;
    Ok(())
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
    read_tree(db, ACCOUNTS_TREE)
}

/// Every record of `tree`, decoded, by key.
fn read_tree<T: serde::de::DeserializeOwned>(
    db: &sled::Db,
    tree: &str,
) -> Result<BTreeMap<String, T>, Error> {
    let mut records = BTreeMap::new();
    for entry in db.open_tree(tree)?.iter() {
        let (key, value) = entry?;
        records.insert(
            String::from_utf8_lossy(&key).into_owned(),
            codec::decode::<T>(&value)?,
        );
    }
    Ok(records)
}

/// Reads the balances of a stopped bank from its data folder.
pub fn balances_in(dir: &Path) -> Result<BTreeMap<String, i64>, Error> {
    balances(&open_stopped(dir)?)
}

/// Every saga outcome the bank's callback handler received, by saga id.
pub fn saga_callbacks(db: &sled::Db) -> Result<BTreeMap<String, ReceivedCallback>, Error> {
    read_tree(db, SAGA_CALLBACKS_TREE)
}

/// Reads the saga outcomes a stopped bank received from its data folder.
pub fn saga_callbacks_in(dir: &Path) -> Result<BTreeMap<String, ReceivedCallback>, Error> {
    saga_callbacks(&open_stopped(dir)?)
}

/// Opens the sled database of a stopped bank (read-only use).
fn open_stopped(dir: &Path) -> Result<sled::Db, Error> {
    if !dir.join("db").exists() {
        return Err(Error::InvalidArgument(format!(
            "{} holds no bank data",
            dir.display()
        )));
    }
    sled::Config::new().path(dir).open().map_err(|e| {
        Error::Storage(format!(
            "cannot open {} (is the bank still running?): {e}",
            dir.display()
        ))
    })
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

/// The two steps of a saga transfer of `amount` from `from` to `to` (each `(bank address,
/// account)`), to run in this order: `debit` (compensated by crediting the payer back), then
/// `credit` (compensated by debiting the payee back).
pub fn transfer_saga_steps(from: (&str, &str), to: (&str, &str), amount: i64) -> Vec<Step> {
    let debit = BankOp::Debit {
        account: from.1.to_string(),
        amount,
    };
    let credit_back = BankOp::Credit {
        account: from.1.to_string(),
        amount,
    };
    let credit = BankOp::Credit {
        account: to.1.to_string(),
        amount,
    };
    let debit_back = BankOp::Debit {
        account: to.1.to_string(),
        amount,
    };
    vec![
        Step::new(
            "debit",
            from.0,
            SAGA_STEP,
            debit.encode(),
            credit_back.encode(),
        ),
        Step::new(
            "credit",
            to.0,
            SAGA_STEP,
            credit.encode(),
            debit_back.encode(),
        ),
    ]
}

/// A saga transfer: [`transfer_saga_steps`] as a sequence.
pub fn transfer_saga(from: (&str, &str), to: (&str, &str), amount: i64) -> Saga {
    Saga::sequence(transfer_saga_steps(from, to, amount))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::Vote;
    use tandem_common::BranchIdx;

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

    fn step_ctx(n: u32, step: u32) -> StepContext {
        StepContext {
            saga: TxnId::parse(&format!("1763850000000-bsaga{n}")).unwrap(),
            step,
            step_name: String::new(),
            resource: SAGA_STEP.into(),
        }
    }

    fn op(op: &str, account: &str, amount: i64) -> Vec<u8> {
        match op {
            "debit" => BankOp::Debit {
                account: account.into(),
                amount,
            },
            _ => BankOp::Credit {
                account: account.into(),
                amount,
            },
        }
        .encode()
    }

    fn total(bank: &Participant) -> i64 {
        balances(bank.db()).unwrap().values().sum()
    }

    #[tokio::test]
    async fn saga_debit_and_credit_move_money_and_their_compensations_restore_it() {
        let dir = tempfile::tempdir().unwrap();
        let bank = open(dir.path()).unwrap();
        ensure_accounts(&bank, &[("alice".into(), 100), ("bob".into(), 5)])
            .await
            .unwrap();
        let steps = transfer_saga_steps(("a:1", "alice"), ("b:1", "bob"), 30);
        assert_eq!(
            steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["debit", "credit"]
        );
        let (debit, credit) = (step_ctx(1, 0), step_ctx(1, 1));
        assert_eq!(
            bank.act(&debit, &steps[0].action).await.unwrap(),
            StepOutcome::Succeeded
        );
        assert_eq!(
            bank.act(&credit, &steps[1].action).await.unwrap(),
            StepOutcome::Succeeded
        );
        assert_eq!(
            balances(bank.db()).unwrap(),
            BTreeMap::from([("alice".into(), 70), ("bob".into(), 35)])
        );
        assert_eq!(
            accounts(bank.db()).unwrap()["alice"],
            Account {
                available: 70,
                held: 0
            },
            "a saga holds nothing"
        );
        // Compensated newest first, as the coordinator does.
        bank.compensate(&credit, &steps[1].compensation)
            .await
            .unwrap();
        assert_eq!(total(&bank), 105 - 30, "the payer's debit is still applied");
        bank.compensate(&debit, &steps[0].compensation)
            .await
            .unwrap();
        assert_eq!(
            balances(bank.db()).unwrap(),
            BTreeMap::from([("alice".into(), 100), ("bob".into(), 5)])
        );
    }

    #[tokio::test]
    async fn a_saga_debit_fails_without_writing_on_insufficient_funds_or_an_unknown_account() {
        let dir = tempfile::tempdir().unwrap();
        let bank = open(dir.path()).unwrap();
        ensure_accounts(&bank, &[("alice".into(), 10)])
            .await
            .unwrap();
        let outcome = bank
            .act(&step_ctx(2, 0), &op("debit", "alice", 11))
            .await
            .unwrap();
        assert!(
            matches!(&outcome, StepOutcome::Failed { reason } if reason.contains("insufficient funds")),
            "{outcome:?}"
        );
        let outcome = bank
            .act(&step_ctx(3, 0), &op("debit", "nobody", 1))
            .await
            .unwrap();
        assert!(
            matches!(&outcome, StepOutcome::Failed { reason } if reason.contains("no account")),
            "{outcome:?}"
        );
        let outcome = bank.act(&step_ctx(4, 0), b"{\"op\":\"x\"}").await.unwrap();
        assert!(
            matches!(&outcome, StepOutcome::Failed { reason } if reason.contains("malformed")),
            "{outcome:?}"
        );
        assert_eq!(
            balances(bank.db()).unwrap(),
            BTreeMap::from([("alice".into(), 10)])
        );
    }

    #[tokio::test]
    async fn a_credit_to_an_unknown_or_closed_account_fails_in_sagas_and_votes_no_in_2pc() {
        let dir = tempfile::tempdir().unwrap();
        let bank = open(dir.path()).unwrap();
        ensure_accounts(&bank, &[("bob".into(), 0), ("carol".into(), 0)])
            .await
            .unwrap();
        close_accounts(&bank, &["carol".into()]).await.unwrap();
        let outcome = bank
            .act(&step_ctx(5, 1), &op("credit", "carol", 5))
            .await
            .unwrap();
        assert!(
            matches!(&outcome, StepOutcome::Failed { reason } if reason.contains("closed")),
            "{outcome:?}"
        );
        let outcome = bank
            .act(&step_ctx(6, 1), &op("credit", "dave", 5))
            .await
            .unwrap();
        assert!(
            matches!(&outcome, StepOutcome::Failed { reason } if reason.contains("no account")),
            "{outcome:?}"
        );
        let vote = bank
            .prepare(&ctx(7), &op("credit", "carol", 5), "http://c:1")
            .await
            .unwrap();
        assert!(
            matches!(&vote, Vote::No { reason } if reason.contains("closed")),
            "{vote:?}"
        );
        assert_eq!(
            bank.act(&step_ctx(8, 1), &op("credit", "bob", 5))
                .await
                .unwrap(),
            StepOutcome::Succeeded,
            "open accounts still take credits"
        );
        // A closed account still pays.
        assert_eq!(
            bank.act(&step_ctx(9, 0), &op("debit", "bob", 5))
                .await
                .unwrap(),
            StepOutcome::Succeeded
        );
    }

    #[tokio::test]
    async fn a_failed_credit_at_another_bank_compensates_the_debit_and_conserves_money() {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (bank_a, bank_b) = (open(dir_a.path()).unwrap(), open(dir_b.path()).unwrap());
        ensure_accounts(&bank_a, &[("alice".into(), 100)])
            .await
            .unwrap();
        ensure_accounts(&bank_b, &[("bob".into(), 50)])
            .await
            .unwrap();
        close_accounts(&bank_b, &["bob".into()]).await.unwrap();
        let money = || total(&bank_a) + total(&bank_b);
        assert_eq!(money(), 150);
        let steps = transfer_saga_steps(("a:1", "alice"), ("b:1", "bob"), 40);
        let (debit, credit) = (step_ctx(10, 0), step_ctx(10, 1));
        assert_eq!(
            bank_a.act(&debit, &steps[0].action).await.unwrap(),
            StepOutcome::Succeeded
        );
        assert_eq!(money(), 110, "in flight: no isolation");
        let failed = bank_b.act(&credit, &steps[1].action).await.unwrap();
        assert!(matches!(failed, StepOutcome::Failed { .. }), "{failed:?}");
        // The coordinator compensates every attempted step, newest first; the failed credit's
        // compensation is a recorded no-op (it must not take 40 from bob).
        bank_b
            .compensate(&credit, &steps[1].compensation)
            .await
            .unwrap();
        bank_a
            .compensate(&debit, &steps[0].compensation)
            .await
            .unwrap();
        // Redeliveries change nothing.
        bank_b
            .compensate(&credit, &steps[1].compensation)
            .await
            .unwrap();
        bank_a
            .compensate(&debit, &steps[0].compensation)
            .await
            .unwrap();
        assert_eq!(balances(bank_a.db()).unwrap()["alice"], 100);
        assert_eq!(balances(bank_b.db()).unwrap()["bob"], 50);
        assert_eq!(money(), 150);
    }

    #[tokio::test]
    async fn taking_back_a_spent_credit_errors_until_the_money_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let bank = open(dir.path()).unwrap();
        ensure_accounts(&bank, &[("bob".into(), 0)]).await.unwrap();
        let credit = step_ctx(11, 1);
        bank.act(&credit, &op("credit", "bob", 30)).await.unwrap();
        // bob spends 20 of it in another saga before this one compensates.
        bank.act(&step_ctx(12, 0), &op("debit", "bob", 20))
            .await
            .unwrap();
        let early = bank.compensate(&credit, &op("debit", "bob", 30)).await;
        assert!(
            matches!(&early, Err(Error::Resource(m)) if m.contains("cannot take 30 back")),
            "{early:?}"
        );
        assert_eq!(balances(bank.db()).unwrap()["bob"], 10, "never negative");
        bank.act(&step_ctx(13, 1), &op("credit", "bob", 25))
            .await
            .unwrap();
        bank.compensate(&credit, &op("debit", "bob", 30))
            .await
            .unwrap();
        assert_eq!(balances(bank.db()).unwrap()["bob"], 5);
    }

    #[tokio::test]
    async fn the_callback_log_records_each_saga_once_and_reads_back_after_a_stop() {
        use crate::saga_state::{SagaPhase, StepPhase, StepState};
        let dir = tempfile::tempdir().unwrap();
        let bank = open(dir.path()).unwrap();
        let outcome = SagaState {
            id: TxnId::parse("1763850000000-cb1").unwrap(),
            phase: SagaPhase::Compensated,
            terminal: true,
            failed_step: "credit".into(),
            reason: "x".repeat(5000),
            steps: vec![StepState {
                name: "credit".into(),
                phase: StepPhase::Failed,
                action_attempts: 1,
                compensation_attempts: 1,
                last_error: "account \"bob\" is closed".into(),
            }],
            stuck: false,
            callback_delivered: false,
            accepted_ms: 1,
            held: false,
        };
        for _ in 0..3 {
            bank.saga_finished(CALLBACK, &outcome).await.unwrap();
        }
        let received = saga_callbacks(bank.db()).unwrap();
        let record = &received["1763850000000-cb1"];
        assert_eq!(record.calls, 1);
        assert_eq!(record.outcome.phase, SagaPhase::Compensated);
        assert_eq!(
            record.outcome.reason.len(),
            crate::saga::REASON_BYTES_MAX,
            "long texts are cut"
        );
        drop(bank);
        let received = saga_callbacks_in(dir.path()).unwrap();
        assert_eq!(received["1763850000000-cb1"].calls, 1);
        let json = serde_json::to_string(&received).unwrap();
        assert!(json.contains("\"phase\":\"compensated\""), "{json}");
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
