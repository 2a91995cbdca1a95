//! `nbhub`: the server (`nbhub serve`) and admin helpers that call its HTTP API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nbhub::client::{AdminArgs, AdminClient};
use nbhub::config::Config;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "nbhub", version, about = "CoAP ingestion server for sleepy NB-IoT / LTE-M devices")]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Run the server (embedded default config unless --config is given; NBHUB_* overrides apply).
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Manage products.
    Product {
        #[command(subcommand)]
        action: ProductAction,
    },
    /// Manage devices.
    Device {
        #[command(subcommand)]
        action: DeviceAction,
    },
    /// Send commands to devices and follow them.
    Command {
        #[command(subcommand)]
        action: CommandAction,
    },
    /// Upgrade firmware or software over PCP.
    Ota {
        #[command(subcommand)]
        action: OtaAction,
    },
    /// Move devices to other nbhub instances (distribution tasks).
    Distribution {
        #[command(subcommand)]
        action: DistributionAction,
    },
    /// Subscribe applications to events.
    Webhook {
        #[command(subcommand)]
        action: WebhookAction,
    },
    /// Show each streaming outlet (NATS, MQTT): connected or not, what it delivered, its lag.
    Outlets {
        #[command(flatten)]
        api: AdminArgs,
    },
    /// Show a device's stored uplinks, oldest first.
    Messages {
        #[command(flatten)]
        api: AdminArgs,
        product_key: String,
        device_name: String,
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum ProductAction {
    Create {
        #[command(flatten)]
        api: AdminArgs,
        #[arg(long)]
        name: String,
        #[arg(long)]
        product_key: Option<String>,
        #[arg(long)]
        dynamic_registration: bool,
        #[arg(long, value_parser = ["pcp", "lwm2m", "none"])]
        ota_protocol: Option<String>,
        #[arg(long)]
        awake_window_s: Option<u32>,
    },
    Show {
        #[command(flatten)]
        api: AdminArgs,
        product_key: String,
    },
}

#[derive(Subcommand)]
enum DeviceAction {
    Create {
        #[command(flatten)]
        api: AdminArgs,
        product_key: String,
        #[arg(long)]
        device_name: Option<String>,
        #[arg(long)]
        device_secret: Option<String>,
        #[arg(long)]
        node_id: Option<String>,
        #[arg(long)]
        psk_hex: Option<String>,
    },
    Show {
        #[command(flatten)]
        api: AdminArgs,
        product_key: String,
        device_name: String,
    },
    /// List a product's devices in name order, filtered; prints one page and its `next` cursor.
    List {
        #[command(flatten)]
        api: AdminArgs,
        product_key: String,
        /// Comma-separated statuses: inactive, online, abnormal, offline.
        #[arg(long)]
        status: Option<String>,
        /// Last heard from at or after this RFC 3339 time.
        #[arg(long)]
        seen_after: Option<String>,
        /// Last heard from before this RFC 3339 time.
        #[arg(long)]
        seen_before: Option<String>,
        #[arg(long)]
        version: Option<String>,
        #[arg(long)]
        cell_id: Option<String>,
        /// The `next` of the previous page.
        #[arg(long)]
        after: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Create a product's devices from a CSV or NDJSON file (columns device_name, device_secret,
    /// node_id, psk_hex, cell_id), all or none; prints the created devices and their secrets as CSV.
    Import {
        #[command(flatten)]
        api: AdminArgs,
        product_key: String,
        file: std::path::PathBuf,
    },
    /// Write a product's devices as CSV (or NDJSON), with their secrets only if asked.
    Export {
        #[command(flatten)]
        api: AdminArgs,
        product_key: String,
        #[arg(long)]
        secrets: bool,
        #[arg(long)]
        ndjson: bool,
    },
}

#[derive(Subcommand)]
enum CommandAction {
    /// Queue a command; it reaches the device when it is next awake (or now, with --immediately).
    Send {
        #[command(flatten)]
        api: AdminArgs,
        product_key: String,
        device_name: String,
        /// The payload as text.
        #[arg(long, conflicts_with_all = ["hex", "base64"], required_unless_present_any = ["hex", "base64"])]
        text: Option<String>,
        /// The payload as hex bytes.
        #[arg(long, conflicts_with = "base64")]
        hex: Option<String>,
        #[arg(long)]
        base64: Option<String>,
        /// Send now if the device is awake, else fail at once.
        #[arg(long)]
        immediately: bool,
        /// Seconds until an unsent command expires (default 86400).
        #[arg(long)]
        expire: Option<u64>,
        /// Topic an Alibaba device receives it on.
        #[arg(long)]
        topic: Option<String>,
    },
    /// Show a command and its state.
    Show {
        #[command(flatten)]
        api: AdminArgs,
        command_id: String,
    },
    /// List a device's commands, oldest first.
    List {
        #[command(flatten)]
        api: AdminArgs,
        product_key: String,
        device_name: String,
    },
    /// Cancel a command that is still PENDING.
    Cancel {
        #[command(flatten)]
        api: AdminArgs,
        command_id: String,
    },
}

#[derive(Subcommand)]
enum OtaAction {
    /// Upload a package file.
    Upload {
        #[command(flatten)]
        api: AdminArgs,
        product_key: String,
        file: PathBuf,
        /// The version the package installs (at most 16 ASCII characters).
        #[arg(long)]
        version: String,
        #[arg(long = "type", value_parser = ["firmware", "software"], default_value = "firmware")]
        kind: String,
        /// Bytes per chunk, 32..=500.
        #[arg(long)]
        chunk_size: Option<u16>,
        /// Versions the package upgrades from (all if none).
        #[arg(long = "source-version")]
        source_versions: Vec<String>,
    },
    /// Start a package on devices of its product.
    Start {
        #[command(flatten)]
        api: AdminArgs,
        package_id: String,
        product_key: String,
        #[arg(required = true)]
        device_names: Vec<String>,
        /// Times a failed device starts over (0..=5).
        #[arg(long)]
        retries: Option<u8>,
        /// Minutes between retries (0..=1440).
        #[arg(long, default_value_t = 5)]
        retry_interval: u64,
    },
    /// Show a task: counts by state and every device's state and progress.
    Show {
        #[command(flatten)]
        api: AdminArgs,
        task_id: String,
    },
    /// Stop a task; unfinished devices become canceled.
    Stop {
        #[command(flatten)]
        api: AdminArgs,
        task_id: String,
    },
}

#[derive(Subcommand)]
enum DistributionAction {
    /// Move a product's devices (all it serves, or those named) to a peer instance.
    Move {
        #[command(flatten)]
        api: AdminArgs,
        product_key: String,
        /// The peer's name in cluster.peers.
        #[arg(long)]
        to: String,
        #[arg(long = "device")]
        device_names: Vec<String>,
        /// Grayscale: devices per batch; the next batch starts once this one is let through.
        #[arg(long)]
        batch_size: Option<usize>,
        /// What lets a batch through: its devices seen online at the destination, or `confirm`.
        #[arg(long, value_parser = ["online", "confirm"])]
        gate: Option<String>,
        /// Seconds a batch may wait for its gate.
        #[arg(long)]
        batch_timeout: Option<u64>,
        /// Then: `pause` the task, or `continue` with the next batch.
        #[arg(long, value_parser = ["pause", "continue"])]
        on_timeout: Option<String>,
    },
    /// Move each device, when it next bootstraps, to the instance nearest its address.
    Nearest {
        #[command(flatten)]
        api: AdminArgs,
        product_key: String,
        #[arg(long = "device")]
        device_names: Vec<String>,
    },
    List {
        #[command(flatten)]
        api: AdminArgs,
    },
    Show {
        #[command(flatten)]
        api: AdminArgs,
        task_id: String,
    },
    /// Every device's result, as JSON or CSV.
    Results {
        #[command(flatten)]
        api: AdminArgs,
        task_id: String,
        #[arg(long)]
        csv: bool,
    },
    /// pause, resume, confirm (let the current batch through), retry (failed devices), cancel
    /// (devices not moved stay) or rollback.
    Control {
        #[command(flatten)]
        api: AdminArgs,
        task_id: String,
        #[arg(value_parser = ["pause", "resume", "confirm", "retry", "cancel", "rollback"])]
        action: String,
    },
}

#[derive(Subcommand)]
enum WebhookAction {
    /// Subscribe a URL; events: uplink, device_status, command_status, ota_progress, shadow (all if
    /// none).
    Create {
        #[command(flatten)]
        api: AdminArgs,
        url: String,
        #[arg(long = "event")]
        events: Vec<String>,
        /// Shared secret: deliveries then carry X-Nbhub-Signature.
        #[arg(long)]
        secret: Option<String>,
    },
    List {
        #[command(flatten)]
        api: AdminArgs,
    },
    Delete {
        #[command(flatten)]
        api: AdminArgs,
        webhook_id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Verb::Serve { config } => serve(config),
        Verb::Product { action } => helper(|| match action {
            ProductAction::Create { api, name, product_key, dynamic_registration, ota_protocol, awake_window_s } => {
                let mut body = json!({ "name": name, "dynamic_registration": dynamic_registration });
                insert(&mut body, "product_key", product_key);
                insert(&mut body, "ota_protocol", ota_protocol);
                insert(&mut body, "awake_window_s", awake_window_s);
                Ok(client(&api)?.post("/api/v1/products", &body)?)
            }
            ProductAction::Show { api, product_key } => {
                Ok(client(&api)?.get(&format!("/api/v1/products/{product_key}"))?)
            }
        }),
        Verb::Device { action } => helper(|| match action {
            DeviceAction::Create { api, product_key, device_name, device_secret, node_id, psk_hex } => {
                let mut body = json!({});
                insert(&mut body, "device_name", device_name);
                insert(&mut body, "device_secret", device_secret);
                insert(&mut body, "node_id", node_id);
                insert(&mut body, "psk_hex", psk_hex);
                Ok(client(&api)?.post(&format!("/api/v1/products/{product_key}/devices"), &body)?)
            }
            DeviceAction::Show { api, product_key, device_name } => {
                Ok(client(&api)?.get(&format!("/api/v1/products/{product_key}/devices/{device_name}"))?)
            }
            DeviceAction::List {
                api,
                product_key,
                status,
                seen_after,
                seen_before,
                version,
                cell_id,
                after,
                limit,
            } => {
                let mut query = form_urlencoded::Serializer::new(String::new());
                let limit = limit.map(|l| l.to_string());
                for (name, value) in [
                    ("status", status),
                    ("seen_after", seen_after),
                    ("seen_before", seen_before),
                    ("version", version),
                    ("cell_id", cell_id),
                    ("after", after),
                    ("limit", limit),
                ] {
                    if let Some(v) = value {
                        query.append_pair(name, &v);
                    }
                }
                Ok(client(&api)?.get(&format!("/api/v1/products/{product_key}/devices?{}", query.finish()))?)
            }
            DeviceAction::Import { api, product_key, file } => {
                let body = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
                let path = format!("/api/v1/products/{product_key}/imports?format=csv");
                Ok(Value::String(client(&api)?.post_file(&path, &body)?))
            }
            DeviceAction::Export { api, product_key, secrets, ndjson } => {
                let format = if ndjson { "ndjson" } else { "csv" };
                let path = format!("/api/v1/products/{product_key}/export?format={format}&secrets={secrets}");
                Ok(Value::String(client(&api)?.get_text(&path)?))
            }
        }),
        Verb::Command { action } => helper(|| command(action)),
        Verb::Ota { action } => helper(|| ota(action)),
        Verb::Distribution { action } => helper(|| distribution(action)),
        Verb::Webhook { action } => helper(|| match action {
            WebhookAction::Create { api, url, events, secret } => {
                let mut body = json!({ "url": url });
                insert(&mut body, "events", (!events.is_empty()).then_some(events));
                insert(&mut body, "secret", secret);
                Ok(client(&api)?.post("/api/v1/webhooks", &body)?)
            }
            WebhookAction::List { api } => Ok(client(&api)?.get("/api/v1/webhooks")?),
            WebhookAction::Delete { api, webhook_id } => {
                Ok(client(&api)?.delete(&format!("/api/v1/webhooks/{webhook_id}"))?)
            }
        }),
        Verb::Outlets { api } => helper(|| Ok(client(&api)?.get("/api/v1/outlets")?)),
        Verb::Messages { api, product_key, device_name, after, limit } => helper(|| {
            let mut path = format!("/api/v1/products/{product_key}/devices/{device_name}/messages?limit={limit}");
            if let Some(a) = after {
                path.push_str(&format!("&after={a}"));
            }
            let mut page = client(&api)?.get(&path)?;
            decode_payloads(&mut page);
            Ok(page)
        }),
    }
}

fn command(action: CommandAction) -> HelperResult {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    match action {
        CommandAction::Send { api, product_key, device_name, text, hex, base64, immediately, expire, topic } => {
            let payload = match (text, hex, base64) {
                (Some(t), _, _) => b64.encode(t),
                (_, Some(h), _) => b64.encode(hex::decode(h.trim()).map_err(|e| format!("--hex: {e}"))?),
                (_, _, Some(b)) => b,
                _ => return Err("give the payload with --text, --hex or --base64".into()),
            };
            let mut body = json!({ "payload_base64": payload });
            if immediately {
                body["send_strategy"] = json!("immediately");
            }
            insert(&mut body, "expire_time", expire);
            insert(&mut body, "topic", topic);
            Ok(client(&api)?.post(&format!("/api/v1/products/{product_key}/devices/{device_name}/commands"), &body)?)
        }
        CommandAction::Show { api, command_id } => Ok(client(&api)?.get(&format!("/api/v1/commands/{command_id}"))?),
        CommandAction::List { api, product_key, device_name } => {
            Ok(client(&api)?.get(&format!("/api/v1/products/{product_key}/devices/{device_name}/commands"))?)
        }
        CommandAction::Cancel { api, command_id } => {
            Ok(client(&api)?.delete(&format!("/api/v1/commands/{command_id}"))?)
        }
    }
}

fn ota(action: OtaAction) -> HelperResult {
    match action {
        OtaAction::Upload { api, product_key, file, version, kind, chunk_size, source_versions } => {
            let data = std::fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let mut path = format!("/api/v1/packages?product_key={product_key}&version={version}&type={kind}");
            if let Some(size) = chunk_size {
                path.push_str(&format!("&chunk_size={size}"));
            }
            if !source_versions.is_empty() {
                path.push_str(&format!("&source_versions={}", source_versions.join(",")));
            }
            Ok(client(&api)?.post_bytes(&path, &data)?)
        }
        OtaAction::Start { api, package_id, product_key, device_names, retries, retry_interval } => {
            let devices: Vec<Value> =
                device_names.iter().map(|dn| json!({"product_key": product_key, "device_name": dn})).collect();
            let mut body = json!({ "package_id": package_id, "devices": devices });
            if let Some(count) = retries {
                body["retry"] = json!({ "count": count, "interval_minutes": retry_interval });
            }
            Ok(client(&api)?.post("/api/v1/ota/tasks", &body)?)
        }
        OtaAction::Show { api, task_id } => Ok(client(&api)?.get(&format!("/api/v1/ota/tasks/{task_id}"))?),
        OtaAction::Stop { api, task_id } => {
            Ok(client(&api)?.post(&format!("/api/v1/ota/tasks/{task_id}/stop"), &json!({}))?)
        }
    }
}

fn distribution(action: DistributionAction) -> HelperResult {
    const TASKS: &str = "/api/v1/distribution/tasks";
    let names = |v: Vec<String>| (!v.is_empty()).then_some(v);
    match action {
        DistributionAction::Move {
            api,
            product_key,
            to,
            device_names,
            batch_size,
            gate,
            batch_timeout,
            on_timeout,
        } => {
            let mut body = json!({ "product_key": product_key, "policy": "specified", "instance": to });
            insert(&mut body, "device_names", names(device_names));
            insert(&mut body, "batch_size", batch_size);
            insert(&mut body, "gate", gate);
            insert(&mut body, "batch_timeout_s", batch_timeout);
            insert(&mut body, "on_timeout", on_timeout);
            Ok(client(&api)?.post(TASKS, &body)?)
        }
        DistributionAction::Nearest { api, product_key, device_names } => {
            let mut body = json!({ "product_key": product_key, "policy": "nearest" });
            insert(&mut body, "device_names", names(device_names));
            Ok(client(&api)?.post(TASKS, &body)?)
        }
        DistributionAction::List { api } => Ok(client(&api)?.get(TASKS)?),
        DistributionAction::Show { api, task_id } => Ok(client(&api)?.get(&format!("{TASKS}/{task_id}"))?),
        DistributionAction::Results { api, task_id, csv } => {
            let format = if csv { "csv" } else { "json" };
            Ok(client(&api)?.get(&format!("{TASKS}/{task_id}/devices?format={format}"))?)
        }
        DistributionAction::Control { api, task_id, action } => {
            Ok(client(&api)?.post(&format!("{TASKS}/{task_id}/{action}"), &json!({}))?)
        }
    }
}

fn serve(config_path: Option<PathBuf>) -> ExitCode {
    let config = match Config::load(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nbhub: {e}");
            return ExitCode::from(2);
        }
    };
    nbhub::telemetry::init_logging(&config.log, config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nbhub: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(nbhub::serve(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "nbhub failed");
            eprintln!("nbhub: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

type HelperResult = Result<Value, Box<dyn std::error::Error>>;

fn helper(f: impl FnOnce() -> HelperResult) -> ExitCode {
    match f() {
        Ok(v) => {
            match v {
                Value::Null => {}
                // A text answer (a CSV download) as it came.
                Value::String(text) => print!("{text}"),
                v => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nbhub: {e}");
            ExitCode::FAILURE
        }
    }
}

fn client(api: &AdminArgs) -> Result<AdminClient, Box<dyn std::error::Error>> {
    Ok(api.connect()?)
}

fn insert(body: &mut Value, key: &str, v: Option<impl Into<Value>>) {
    if let Some(v) = v {
        body[key] = v.into();
    }
}

/// Adds a `payload` text field beside `payload_base64` when the bytes are UTF-8, for reading.
fn decode_payloads(page: &mut Value) {
    use base64::Engine;
    let Some(messages) = page["messages"].as_array_mut() else { return };
    for m in messages {
        let decoded =
            m["payload_base64"].as_str().and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
        if let Some(text) = decoded.and_then(|d| String::from_utf8(d).ok()) {
            m["payload"] = Value::String(text);
        }
    }
}
