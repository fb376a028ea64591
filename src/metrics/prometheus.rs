//! The Prometheus endpoint (cargo feature `prometheus`), on
//! `metrics-exporter-prometheus`'s HTTP listener.

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::error::Error;

/// The endpoint this process serves, once started.
static SERVING: Mutex<Option<PrometheusEndpoint>> = Mutex::new(None);

/// A running Prometheus endpoint, from [`serve_prometheus`].
///
/// It serves until the process exits; this value only describes it.
#[derive(Clone, Debug)]
pub struct PrometheusEndpoint {
    addr: SocketAddr,
    handle: PrometheusHandle,
}

impl PrometheusEndpoint {
    /// The address it listens on, as asked for.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What a scrape of `/metrics` returns now (the Prometheus text format).
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

/// Serves every metric of this process for Prometheus at
/// `http://{addr}/metrics`, on a thread of its own, and installs the
/// process's global `metrics` recorder.
///
/// Returns once the listener is bound: a client can connect as soon as it
/// has returned. It serves until the process exits. Call it before creating
/// consumers and producers (a consumer registers its metrics when it is
/// created), or set `metrics.prometheus_listen` and let the consumer start
/// it. Port 0 would bind a port that cannot be learnt: name one.
///
/// # Errors
///
/// [`Error::Prometheus`] when the address cannot be bound, when this
/// process already serves an endpoint (a second call, or a consumer started
/// one), or when another `metrics` recorder is installed.
///
/// ```no_run
/// # fn main() -> Result<(), kafka_batch::Error> {
/// let endpoint = kafka_batch::metrics::serve_prometheus(([0, 0, 0, 0], 9464).into())?;
/// println!("metrics at http://{}/metrics", endpoint.addr());
/// # Ok(()) }
/// ```
pub fn serve_prometheus(addr: SocketAddr) -> Result<PrometheusEndpoint, Error> {
    let mut serving = SERVING.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(endpoint) = &*serving {
        return Err(Error::Prometheus {
            addr,
            reason: format!(
                "this process already serves Prometheus metrics on {} (serve_prometheus was called before, or a consumer's metrics.prometheus_listen started it); there is one endpoint per process",
                endpoint.addr
            ),
        });
    }
    let endpoint = start(addr).map_err(|reason| Error::Prometheus { addr, reason })?;
    *serving = Some(endpoint.clone());
    Ok(endpoint)
}

/// Serves on `addr` unless this process already does (`metrics.prometheus_listen`).
/// The error is the reason, for the caller to name the setting.
pub(crate) fn ensure_serving(addr: SocketAddr) -> Result<(), String> {
    let mut serving = SERVING.lock().unwrap_or_else(PoisonError::into_inner);
    match &*serving {
        Some(endpoint) if endpoint.addr == addr => Ok(()),
        Some(endpoint) => Err(format!(
            "this process already serves Prometheus metrics on {}, and there is one endpoint per process",
            endpoint.addr
        )),
        None => {
            *serving = Some(start(addr)?);
            Ok(())
        }
    }
}

fn start(addr: SocketAddr) -> Result<PrometheusEndpoint, String> {
    // A runtime of its own, on its own thread: the endpoint outlives
    // whichever runtime the caller has (or does not have).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start its runtime: {e}"))?;
    // `build` binds the listener (and spawns the recorder's upkeep) on the
    // runtime entered; the future it returns serves the connections.
    let built = {
        let _entered = runtime.enter();
        PrometheusBuilder::new().with_http_listener(addr).build()
    };
    let (recorder, exporter) = match built {
        Ok(built) => built,
        Err(e) => {
            runtime.shutdown_background();
            return Err(format!("cannot listen there: {e}"));
        }
    };
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        // Dropping the future closes the listener.
        drop(exporter);
        runtime.shutdown_background();
        return Err("another metrics recorder is already installed in this process; leave metrics.prometheus_listen empty and serve that recorder's metrics, or do not install it".into());
    }
    std::thread::Builder::new()
        .name("kafka-batch-prometheus".into())
        .spawn(move || {
            if let Err(e) = runtime.block_on(exporter) {
                tracing::error!(error = ?e, %addr, "the Prometheus endpoint stopped");
            }
        })
        .map_err(|e| format!("cannot start its thread: {e}"))?;
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(PrometheusEndpoint { addr, handle })
}
