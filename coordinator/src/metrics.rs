//! The coordinator's Prometheus metrics: one registry, typed handles the runtime updates, and
//! the `/metrics` HTTP endpoint (`tandem serve --metrics-listen ADDR`).
//!
//! Every series exists from the start (all label values are created up front, at zero), so a
//! dashboard sees a flat line rather than a gap, and the hot path never looks a series up:
//! it holds the handle. An observation is one or two relaxed atomic adds, no lock and no
//! allocation; histograms are [`AtomicHistogram`]s for that reason (prometheus-client's own
//! histogram takes a mutex per observation). Rendering (a scrape) allocates; it is off the hot
//! path.
//!
//! What is counted where (docs/operations.md has the reference table):
//! - a 2PC transaction *starts* when the runtime begins it (a retry that joins one in flight
//!   does not start another) and *finishes* when its outcome is durable and the client is
//!   answered; a saga starts when it is submitted and finishes when its outcome is durable.
//!   Transactions and sagas found unfinished at start-up are *recovered*, not started, so
//!   `started + recovered - finished` is what is in flight;
//! - end-to-end latency is measured from start to finish in this process (recovered ones are
//!   not measured: their start was in an earlier process); the prepare round from a 2PC
//!   transaction's start to its decision;
//! - retries: a decision sent again, an action or a compensation retried, a callback
//!   re-sent. Prepares are sent once (the engine aborts rather than retry), so they have no
//!   series;
//! - flushes come from the group-commit flusher through [`FlushObserver`];
//! - the log's size on disk is measured at each scrape, from the log handed to
//!   [`Metrics::watch_log`] (a few `stat` calls, on a blocking thread).
//!
//! Output is the OpenMetrics text format, which Prometheus scrapes natively.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use tandem_common::group_commit::FlushObserver;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::log::TxnLog;

/// The content type of the rendered metrics.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Most scrapes served at once; further connections wait for a slot.
pub const SCRAPES_IN_FLIGHT_MAX: usize = 16;
/// How long a scraper may take to send its request headers.
pub const SCRAPE_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Bucket bounds of the latency histograms, in seconds.
const LATENCY_BUCKETS_S: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Bucket bounds of the flush batch size histogram, in jobs.
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// The two kinds of transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    TwoPc,
    Saga,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::TwoPc, Kind::Saga];

    fn label(self) -> &'static str {
        match self {
            Kind::TwoPc => "2pc",
            Kind::Saga => "saga",
        }
    }
}

/// How a transaction or saga finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    Committed,
    Aborted,
    SagaCompleted,
    SagaCompensated,
    SagaAborted,
}

impl Finished {
    const ALL: [Finished; 5] = [
        Finished::Committed,
        Finished::Aborted,
        Finished::SagaCompleted,
        Finished::SagaCompensated,
        Finished::SagaAborted,
    ];

    fn kind(self) -> Kind {
        match self {
            Finished::Committed | Finished::Aborted => Kind::TwoPc,
            Finished::SagaCompleted | Finished::SagaCompensated | Finished::SagaAborted => {
                Kind::Saga
            }
        }
    }

    fn label(self) -> &'static str {
        match self {
            Finished::Committed => "committed",
            Finished::Aborted | Finished::SagaAborted => "aborted",
            Finished::SagaCompleted => "completed",
            Finished::SagaCompensated => "compensated",
        }
    }
}

/// What was retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A 2PC decision sent again to a branch that had not acknowledged it.
    Decision,
    /// A saga step's action sent again after it got no answer.
    Action,
    /// A compensation sent again after it failed.
    Compensation,
    /// A saga's completion callback sent again.
    Callback,
}

impl Retry {
    const ALL: [Retry; 4] = [
        Retry::Decision,
        Retry::Action,
        Retry::Compensation,
        Retry::Callback,
    ];

    fn label(self) -> &'static str {
        match self {
            Retry::Decision => "decision",
            Retry::Action => "action",
            Retry::Compensation => "compensation",
            Retry::Callback => "callback",
        }
    }
}

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// The registry and a handle to every series.
pub struct Metrics {
    registry: Registry,
    started: [Counter; 2],
    recovered: [Counter; 2],
    finished: [Counter; 5],
    latency: [AtomicHistogram; 2],
    prepare_round: AtomicHistogram,
    flush: AtomicHistogram,
    flush_batch: AtomicHistogram,
    in_flight: [Gauge; 2],
    retries: [Counter; 4],
    sagas_stuck: Gauge,
    sagas_held: Gauge,
    log_size: Gauge,
    /// The log whose size a scrape reports.
    log: OnceLock<Arc<dyn TxnLog>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics { .. }")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn latency_histogram() -> AtomicHistogram {
    AtomicHistogram::new(LATENCY_BUCKETS_S)
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let kinds = |family: &Family<Labels1, Counter>| {
            Kind::ALL.map(|k| family.get_or_create_owned(&[("kind", k.label())]))
        };

        let started = Family::<Labels1, Counter>::default();
        registry.register(
            "tandem_transactions_started",
            "Transactions (kind=2pc) and sagas (kind=saga) begun by this process",
            started.clone(),
        );
        let recovered = Family::<Labels1, Counter>::default();
        registry.register(
            "tandem_transactions_recovered",
            "Unfinished transactions and sagas taken over from the log at start-up",
            recovered.clone(),
        );
        let finished = Family::<Labels2, Counter>::default();
        registry.register(
            "tandem_transactions_finished",
            "Transactions and sagas whose outcome became durable, by outcome",
            finished.clone(),
        );
        let latency =
            Family::<Labels1, AtomicHistogram, fn() -> AtomicHistogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "tandem_transaction_duration_seconds",
            "From start to durable outcome: a 2PC transaction until its client is answered, a saga from submission until its outcome is durable",
            latency.clone(),
        );
        let prepare_round = latency_histogram();
        registry.register(
            "tandem_prepare_round_seconds",
            "From a 2PC transaction's start until it is decided (every vote in, a NO, or the deadline)",
            prepare_round.clone(),
        );
        let flush = latency_histogram();
        registry.register(
            "tandem_log_flush_seconds",
            "Duration of one group-commit flush of the coordinator's log (sled flush and fdatasync)",
            flush.clone(),
        );
        let flush_batch = AtomicHistogram::new(BATCH_SIZE_BUCKETS);
        registry.register(
            "tandem_log_flush_batch_size",
            "Writers served by one group-commit flush",
            flush_batch.clone(),
        );
        let in_flight = Family::<Labels1, Gauge>::default();
        registry.register(
            "tandem_transactions_in_flight",
            "Transactions and sagas in the runtime now",
            in_flight.clone(),
        );
        let retries = Family::<Labels1, Counter>::default();
        registry.register(
            "tandem_retries",
            "Calls to participants sent again: decision, action, compensation, callback",
            retries.clone(),
        );
        let sagas_stuck = Gauge::default();
        registry.register(
            "tandem_sagas_stuck",
            "Sagas whose compensation in progress has failed saga_stuck_after_failures times in a row",
            sagas_stuck.clone(),
        );
        let sagas_held = Gauge::default();
        registry.register(
            "tandem_sagas_held",
            "Sagas accepted while execution was held, waiting to be released",
            sagas_held.clone(),
        );
        let log_size = Gauge::default();
        registry.register(
            "tandem_log_size_bytes",
            "Size of the coordinator's log on disk, measured at each scrape",
            log_size.clone(),
        );

        Metrics {
            started: kinds(&started),
            recovered: kinds(&recovered),
            finished: Finished::ALL.map(|f| {
                finished.get_or_create_owned(&[("kind", f.kind().label()), ("outcome", f.label())])
            }),
            latency: Kind::ALL.map(|k| latency.get_or_create_owned(&[("kind", k.label())])),
            prepare_round,
            flush,
            flush_batch,
            in_flight: Kind::ALL.map(|k| in_flight.get_or_create_owned(&[("kind", k.label())])),
            retries: Retry::ALL.map(|r| retries.get_or_create_owned(&[("kind", r.label())])),
            sagas_stuck,
            sagas_held,
            log_size,
            log: OnceLock::new(),
            registry,
        }
    }

    pub fn started(&self, kind: Kind) {
        self.started[kind as usize].inc();
    }

    pub fn recovered(&self, kind: Kind) {
        self.recovered[kind as usize].inc();
    }

    /// A transaction or saga finished; `took` is its end-to-end latency if it started in this
    /// process.
    pub fn finished(&self, how: Finished, took: Option<Duration>) {
        self.finished[how as usize].inc();
        if let Some(took) = took {
            self.latency[how.kind() as usize].observe(took.as_secs_f64());
        }
    }

    pub fn prepare_round(&self, took: Duration) {
        self.prepare_round.observe(took.as_secs_f64());
    }

    pub fn retried(&self, what: Retry) {
        self.retries[what as usize].inc();
    }

    pub fn set_in_flight(&self, kind: Kind, n: usize) {
        self.in_flight[kind as usize].set(n as i64);
    }

    pub fn set_sagas_stuck(&self, n: usize) {
        self.sagas_stuck.set(n as i64);
    }

    pub fn set_sagas_held(&self, n: usize) {
        self.sagas_held.set(n as i64);
    }

    pub fn set_log_size(&self, bytes: u64) {
        self.log_size.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Has every scrape report `log`'s size on disk. Only the first log handed in counts.
    pub fn watch_log(&self, log: Arc<dyn TxnLog>) {
        let _ = self.log.set(log);
    }

    /// Reads the watched log's size on disk into its gauge. Blocking I/O (sled lists its
    /// folder): call it off the async workers.
    pub fn sample_log_size(&self) {
        if let Some(log) = self.log.get() {
            self.set_log_size(log.size_on_disk());
        }
    }

    /// Every series in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut text = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

impl FlushObserver for Metrics {
    fn flushed(&self, batch_size: usize, took: Duration) {
        self.flush.observe(took.as_secs_f64());
        self.flush_batch.observe(batch_size as f64);
    }
}

/// A histogram with fixed buckets whose observations are relaxed atomic adds. Cheap to clone
/// (the clones share the counts). The count is the sum of the buckets, read at render time, so
/// buckets and count always agree; the sum may lag them by the observations in progress.
#[derive(Clone, Debug)]
pub struct AtomicHistogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug)]
struct HistogramInner {
    bounds: &'static [f64],
    /// One per bound, then one for +Inf.
    buckets: Box<[AtomicU64]>,
    /// The sum of the observations, as f64 bits.
    sum_bits: AtomicU64,
}

impl AtomicHistogram {
    /// `bounds` must be finite and increasing.
    pub fn new(bounds: &'static [f64]) -> Self {
        assert!(
            bounds.windows(2).all(|w| w[0] < w[1]) && bounds.iter().all(|b| b.is_finite()),
            "histogram bounds must be finite and increasing"
        );
        AtomicHistogram {
            inner: Arc::new(HistogramInner {
                bounds,
                buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum_bits: AtomicU64::new(0f64.to_bits()),
            }),
        }
    }

    pub fn observe(&self, value: f64) {
        let inner = &*self.inner;
        let bucket = inner.bounds.partition_point(|&bound| bound < value);
        inner.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let _ = inner
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    /// How many observations so far.
    pub fn count(&self) -> u64 {
        self.inner
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &*self.inner;
        let buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(inner.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = f64::from_bits(inner.sum_bits.load(Ordering::Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Why the metrics endpoint stopped.
#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint: {0}")]
pub struct MetricsServerError(#[from] std::io::Error);

/// Serves `GET /metrics` on `listener` until `shutdown` resolves. Any other path is 404, any
/// other method 405. At most [`SCRAPES_IN_FLIGHT_MAX`] connections are served at once.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), MetricsServerError> {
    let slots = Arc::new(Semaphore::new(SCRAPES_IN_FLIGHT_MAX));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => return Ok(()),
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(metrics, &request).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(SCRAPE_HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
    }
}

async fn answer<B>(metrics: Arc<Metrics>, request: &Request<B>) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET is allowed\n");
    }
    let rendered = tokio::task::spawn_blocking(move || {
        metrics.sample_log_size();
        metrics.render()
    })
    .await;
    let Ok(text) = rendered else {
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "rendering the metrics failed\n",
        );
    };
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(CONTENT_TYPE),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the series `name` with exactly `labels` (`""` for none), from `text`.
    fn value(text: &str, name: &str, labels: &str) -> f64 {
        let series = if labels.is_empty() {
            name.to_string()
        } else {
            format!("{name}{{{labels}}}")
        };
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{series} ")))
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn every_series_renders_from_the_start_and_moves_with_its_observations() {
        let metrics = Metrics::new();
        let empty = metrics.render();
        assert!(empty.ends_with("# EOF\n"), "{empty}");
        assert_eq!(
            value(&empty, "tandem_transactions_started_total", "kind=\"saga\""),
            0.0
        );
        assert_eq!(
            value(
                &empty,
                "tandem_transactions_finished_total",
                "kind=\"saga\",outcome=\"compensated\""
            ),
            0.0
        );

        metrics.started(Kind::TwoPc);
        metrics.started(Kind::TwoPc);
        metrics.recovered(Kind::Saga);
        metrics.finished(Finished::Committed, Some(Duration::from_millis(3)));
        metrics.finished(Finished::SagaCompensated, None);
        metrics.prepare_round(Duration::from_millis(2));
        metrics.retried(Retry::Compensation);
        metrics.set_in_flight(Kind::TwoPc, 7);
        metrics.set_sagas_stuck(1);
        metrics.set_sagas_held(3);
        metrics.set_log_size(4096);
        metrics.flushed(3, Duration::from_micros(700));
        metrics.flushed(40, Duration::from_millis(20));

        let text = metrics.render();
        let v = |name: &str, labels: &str| value(&text, name, labels);
        assert_eq!(v("tandem_transactions_started_total", "kind=\"2pc\""), 2.0);
        assert_eq!(
            v("tandem_transactions_recovered_total", "kind=\"saga\""),
            1.0
        );
        assert_eq!(
            v(
                "tandem_transactions_finished_total",
                "kind=\"2pc\",outcome=\"committed\""
            ),
            1.0
        );
        assert_eq!(
            v(
                "tandem_transactions_finished_total",
                "kind=\"saga\",outcome=\"compensated\""
            ),
            1.0
        );
        assert_eq!(
            v("tandem_transaction_duration_seconds_count", "kind=\"2pc\""),
            1.0
        );
        // 3 ms falls in the 5 ms bucket (cumulative), not the 2.5 ms one.
        assert_eq!(
            v(
                "tandem_transaction_duration_seconds_bucket",
                "le=\"0.0025\",kind=\"2pc\""
            ),
            0.0
        );
        assert_eq!(
            v(
                "tandem_transaction_duration_seconds_bucket",
                "le=\"0.005\",kind=\"2pc\""
            ),
            1.0
        );
        assert_eq!(
            v("tandem_transaction_duration_seconds_count", "kind=\"saga\""),
            0.0,
            "a recovered saga's latency is not measured"
        );
        assert_eq!(v("tandem_prepare_round_seconds_count", ""), 1.0);
        assert_eq!(v("tandem_retries_total", "kind=\"compensation\""), 1.0);
        assert_eq!(v("tandem_retries_total", "kind=\"decision\""), 0.0);
        assert_eq!(v("tandem_transactions_in_flight", "kind=\"2pc\""), 7.0);
        assert_eq!(v("tandem_sagas_stuck", ""), 1.0);
        assert_eq!(v("tandem_sagas_held", ""), 3.0);
        assert_eq!(v("tandem_log_size_bytes", ""), 4096.0);
        assert_eq!(v("tandem_log_flush_seconds_count", ""), 2.0);
        assert_eq!(v("tandem_log_flush_batch_size_count", ""), 2.0);
        assert_eq!(v("tandem_log_flush_batch_size_sum", ""), 43.0);
        assert_eq!(v("tandem_log_flush_batch_size_bucket", "le=\"4.0\""), 1.0);
        assert_eq!(v("tandem_log_flush_batch_size_bucket", "le=\"+Inf\""), 2.0);
        assert!(
            text.contains("# TYPE tandem_log_flush_batch_size histogram"),
            "{text}"
        );
    }

    #[test]
    fn histogram_buckets_hold_values_at_their_upper_bound_and_overflow_to_inf() {
        let histogram = AtomicHistogram::new(&[1.0, 2.0]);
        for value in [0.5, 1.0, 1.5, 2.0, 9.0] {
            histogram.observe(value);
        }
        let counts: Vec<u64> = histogram
            .inner
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts, [2, 2, 1]);
        assert_eq!(histogram.count(), 5);
        assert_eq!(
            f64::from_bits(histogram.inner.sum_bits.load(Ordering::Relaxed)),
            14.0
        );
    }

    #[tokio::test]
    async fn the_endpoint_serves_metrics_and_refuses_other_paths() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        metrics.started(Kind::Saga);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, metrics, async {
            let _ = stopped.await;
        }));
        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let answer = get("/metrics").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains(CONTENT_TYPE), "{answer}");
        assert!(
            answer.contains("tandem_transactions_started_total{kind=\"saga\"} 1"),
            "{answer}"
        );
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
