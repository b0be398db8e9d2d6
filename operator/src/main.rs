use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use kandle_operator::api::FailureMode as PickerFailureMode;
use kandle_operator::controller::build::{BuildSettings, PickerDefaults};
use kandle_operator::controller::{self, ControllerConfig};
use kandle_operator::http::Probes;
use kandle_operator::leader::{Elector, LeaseConfig};
use kandle_operator::router::proxy::RouterSettings;
use kandle_operator::router::quota::FailureMode;
use kandle_operator::router::{Discovery, RouterConfig, TenancyConfig};
use kandle_operator::telemetry::{self, Metrics};

#[derive(Debug, Parser)]
#[command(name = "kandle-operator", version, about = "The kandle operator: controller, router and CRDs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Reconcile ModelDeployments into worker Deployments, Services and PodDisruptionBudgets.
    Controller(ControllerArgs),
    /// Serve the routing API: map each request's `model` to a pool of workers.
    Router(RouterArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Read pools' demand as JSON lines on stdin and write the autoscaler's
    /// decision for each: to try a scaling policy without a cluster.
    Decide,
}

#[derive(Debug, Args)]
struct RouterArgs {
    /// Route file (YAML: models with aliases and worker URLs), reloaded when it
    /// changes; without it, pools are discovered from ModelDeployments and EndpointSlices.
    #[arg(long, env = "KANDLE_ROUTES")]
    routes: Option<PathBuf>,
    /// Discover only in this namespace (default: all namespaces).
    #[arg(long, env = "KANDLE_NAMESPACE", conflicts_with = "routes")]
    namespace: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "KANDLE_HOST", default_value = "0.0.0.0")]
    host: IpAddr,
    /// Port to listen on (0 picks a free one and logs it).
    #[arg(long, env = "KANDLE_PORT", default_value_t = 8080)]
    port: u16,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "KANDLE_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Choose workers by load alone, not by where a prompt's prefix was served.
    #[arg(long, env = "KANDLE_NO_PREFIX_ROUTING")]
    no_prefix_routing: bool,
    /// Prefix routing's load bound: a worker takes requests for the prefixes it
    /// holds while it carries less than this factor times the mean load
    /// (rounded up); past it the next worker in line does. At least 1.
    #[arg(long, env = "KANDLE_PREFIX_LOAD_FACTOR", default_value_t = 2.0, value_parser = load_factor)]
    prefix_load_factor: f64,
    /// Seconds to connect to a worker before trying another.
    #[arg(long, env = "KANDLE_CONNECT_TIMEOUT", default_value_t = 5)]
    connect_timeout: u64,
    /// Seconds a pool may take to list its models; the model list goes out
    /// without a pool that takes longer.
    #[arg(long, env = "KANDLE_MODEL_LIST_TIMEOUT", default_value_t = 5)]
    model_list_timeout: u64,
    /// How long a request waits for a pool with no ready worker that can come
    /// up (scaling from zero, pods starting) before a 503: long enough for a
    /// large model's cold start (`90s`, `10m`; a bare number is seconds).
    #[arg(long, env = "KANDLE_HOLD_TIMEOUT", default_value = "10m", value_parser = kandle_operator::duration::parse)]
    hold_timeout: Duration,
    /// Requests held per model at most; past it they get 429 with Retry-After.
    #[arg(long, env = "KANDLE_MAX_HELD", default_value_t = 256)]
    max_held: usize,
    /// Tenants file (YAML: `tenants: [{name, keys, requestsPerMinute,
    /// tokensPerMinute, concurrentRequests, models}]`), reloaded when it
    /// changes. With it, every request needs a tenant's key.
    #[arg(long, env = "KANDLE_TENANTS")]
    tenants: Option<PathBuf>,
    /// Redis or Valkey that keeps tenants' limits for every router replica
    /// (`redis://host:6379/0`, `rediss://` for TLS); without it, each router
    /// keeps them in process.
    #[arg(long, env = "KANDLE_QUOTA_STORE", requires = "tenants")]
    quota_store: Option<String>,
    /// While the quota store cannot be reached: `open` serves without limits,
    /// `closed` refuses requests of tenants that have limits (503).
    #[arg(long, env = "KANDLE_QUOTA_STORE_FAILURE", value_enum, default_value = "open", requires = "quota_store")]
    quota_store_failure: FailureMode,
    /// Time one call to the quota store may take before it counts as unreachable.
    #[arg(long, env = "KANDLE_QUOTA_STORE_TIMEOUT", default_value = "500ms", value_parser = kandle_operator::duration::parse)]
    quota_store_timeout: Duration,
    /// How long a request past its tenant's limit waits for the budget to
    /// refill (or a concurrent request to end) before it gets 429; `0` answers
    /// 429 at once, as OpenAI does.
    #[arg(long, env = "KANDLE_QUOTA_WAIT", default_value = "0s", requires = "tenants", value_parser = kandle_operator::duration::parse)]
    quota_wait: Duration,
    /// With tenants: file holding the key the router shows workers instead of
    /// callers' keys (put it in every pool's key Secret), reloaded when it
    /// changes. Without tenants it would let anyone in, so it needs --tenants.
    #[arg(long, env = "KANDLE_UPSTREAM_KEY_FILE", requires = "tenants")]
    upstream_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ControllerArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "KANDLE_NAMESPACE")]
    namespace: Option<String>,
    /// Worker image for ModelDeployments that name none.
    #[arg(long, env = "KANDLE_WORKER_IMAGE", default_value_t = BuildSettings::default().worker_image)]
    worker_image: String,
    /// Worker image for pods that request nvidia.com/gpu.
    #[arg(long, env = "KANDLE_WORKER_IMAGE_CUDA", default_value_t = BuildSettings::default().worker_image_cuda)]
    worker_image_cuda: String,
    /// Cluster DNS domain, for the endpoints reported in status.
    #[arg(long, env = "KANDLE_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// The endpoint picker Service of InferencePools whose spec names none;
    /// `{name}` stands for the ModelDeployment's name.
    #[arg(long, env = "KANDLE_ENDPOINT_PICKER_NAME", default_value_t = PickerDefaults::default().name)]
    endpoint_picker_name: String,
    /// Its port, when the spec names none.
    #[arg(long, env = "KANDLE_ENDPOINT_PICKER_PORT", default_value_t = PickerDefaults::default().port,
          value_parser = clap::value_parser!(i32).range(1..=65535))]
    endpoint_picker_port: i32,
    /// FailClose or FailOpen, when the spec says neither.
    #[arg(long, env = "KANDLE_ENDPOINT_PICKER_FAILURE_MODE", default_value = "FailClose")]
    endpoint_picker_failure_mode: PickerFailureMode,
    /// Address of /metrics, /health and /ready.
    #[arg(long, env = "KANDLE_METRICS_ADDRESS", default_value = "0.0.0.0:8081")]
    metrics_address: SocketAddr,
    /// Namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kandle-system")]
    lease_namespace: String,
    /// This replica's identity in the Lease (its pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Name of the leader-election Lease; each installation needs its own (the
    /// chart derives it from the release name).
    #[arg(long, env = "KANDLE_LEASE_NAME", default_value = "kandle-operator-leader")]
    lease_name: String,
    /// Labels of the router pods (in the operator's namespace), whose `/metrics`
    /// give the requests in flight and held per model to the autoscaler.
    #[arg(long, env = "KANDLE_ROUTER_SELECTOR", default_value = "app.kubernetes.io/name=kandle-router")]
    router_selector: String,
    /// Time between two autoscaling decisions (`15s`, `1m`; a bare number is seconds).
    #[arg(long, env = "KANDLE_SCALE_INTERVAL", default_value = "10s", value_parser = kandle_operator::duration::parse)]
    scale_interval: Duration,
    /// Compile the Tenant resources and their keys into this Secret (in the
    /// operator's namespace), which the routers mount as their `--tenants` file.
    #[arg(long, env = "KANDLE_TENANTS_SECRET")]
    tenants_secret: Option<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // HTTP clients (kube's, reqwest's) use rustls with ring; install it once for all.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Crd => kandle_operator::crd::yaml().map(|y| print!("{y}")).map_err(anyhow::Error::from),
        Command::Decide => {
            kandle_operator::autoscaler::lines::run(std::io::stdin().lock(), std::io::stdout().lock(), Instant::now)
                .context("reading observations or writing decisions")
        }
        Command::Controller(args) => {
            telemetry::init_logging();
            tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|rt| rt.block_on(run_controller(args)))
        }
        Command::Router(args) => {
            telemetry::init_logging();
            tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|rt| rt.block_on(run_router(args)))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kandle-operator: {e:#}");
            tracing::error!(error = format!("{e:#}"), "kandle-operator failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(Metrics::default());
    let probes = Probes::default();
    let listener = tokio::net::TcpListener::bind(args.metrics_address)
        .await
        .with_context(|| format!("binding {}", args.metrics_address))?;
    let ops = axum::serve(listener, kandle_operator::http::router(metrics.clone(), probes.clone()));
    tokio::spawn(async move {
        if let Err(e) = ops.await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });

    let identity = args.identity.clone().unwrap_or_else(|| format!("kandle-operator-{}", std::process::id()));
    let elector = Elector::new(
        kube::Api::namespaced(client.clone(), &args.lease_namespace),
        LeaseConfig {
            name: args.lease_name.clone(),
            identity: identity.clone(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(4),
        },
    );
    // Every replica is ready (it can take over); only the leader reconciles.
    probes.set_ready(true);
    tracing::info!(%identity, "waiting for the leader lease");
    tokio::select! {
        () = elector.acquire() => {}
        () = shutdown_signal() => return Ok(()),
    }
    metrics.leader.set(1);
    tracing::info!(%identity, "leading; starting the controller");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let config = ControllerConfig {
        namespace: args.namespace,
        settings: BuildSettings {
            worker_image: args.worker_image,
            worker_image_cuda: args.worker_image_cuda,
            cluster_domain: args.cluster_domain,
            endpoint_picker: PickerDefaults {
                name: args.endpoint_picker_name,
                port: args.endpoint_picker_port,
                failure_mode: args.endpoint_picker_failure_mode,
            },
        },
        identity,
        router_namespace: args.lease_namespace.clone(),
        router_selector: args.router_selector,
        scale_interval: args.scale_interval,
        tenants_secret: args.tenants_secret,
    };
    let mut stop = stop_rx.clone();
    let controller = tokio::spawn(controller::run(client, config, metrics.clone(), async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    let lost = tokio::select! {
        () = elector.hold() => true,
        () = shutdown_signal() => false,
    };
    let _ = stop_tx.send(true);
    controller.await.context("controller task failed")?;
    metrics.leader.set(0);
    if lost {
        anyhow::bail!("lost the leader lease; exiting so a fresh replica can take over")
    }
    // Hand over at once rather than leave the pool without a leader until the lease expires.
    match elector.release().await {
        Ok(()) => tracing::info!("released the leader lease"),
        Err(e) => tracing::warn!(error = %e, "cannot release the leader lease; it expires by itself"),
    }
    tracing::info!("stopped");
    Ok(())
}

async fn run_router(args: RouterArgs) -> anyhow::Result<()> {
    let discovery = match args.routes {
        Some(path) => Discovery::RouteFile(path),
        None => Discovery::Kubernetes { namespace: args.namespace },
    };
    let config = RouterConfig {
        address: SocketAddr::new(args.host, args.port),
        discovery,
        settings: RouterSettings {
            max_body_bytes: args.max_body_bytes,
            prefix_routing: !args.no_prefix_routing,
            prefix_load_factor: args.prefix_load_factor,
            cooldown: Duration::from_secs(5),
            model_list_timeout: Duration::from_secs(args.model_list_timeout),
            hold_timeout: args.hold_timeout,
            max_held: args.max_held,
        },
        connect_timeout: Duration::from_secs(args.connect_timeout),
        tenancy: TenancyConfig {
            tenants_file: args.tenants,
            quota_store: args.quota_store,
            quota_store_failure: args.quota_store_failure,
            quota_store_timeout: args.quota_store_timeout,
            upstream_key_file: args.upstream_key_file,
            quota_wait: args.quota_wait,
        },
    };
    kandle_operator::router::run(config, shutdown_signal()).await
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = terminate => {},
    }
}

/// `--prefix-load-factor`: a finite number of at least 1 (below 1 no worker
/// could be under the bound when all are busy).
fn load_factor(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 1.0 => Ok(f),
        _ => Err(format!("`{text}` is not a number of at least 1")),
    }
}
