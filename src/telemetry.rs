//! Logging (tracing) and metrics (Prometheus text on the admin port).

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Metric names, in one place so dashboards and code agree.
pub mod metric {
    pub const DATAGRAMS_RECEIVED: &str = "nbhub_datagrams_received_total";
    pub const DATAGRAMS_SENT: &str = "nbhub_datagrams_sent_total";
    pub const BYTES_RECEIVED: &str = "nbhub_bytes_received_total";
    pub const BYTES_SENT: &str = "nbhub_bytes_sent_total";
    pub const MALFORMED: &str = "nbhub_coap_malformed_total";
    pub const DUPLICATES: &str = "nbhub_coap_duplicates_total";
    pub const RESPONSES: &str = "nbhub_coap_responses_total";
    pub const RETRANSMISSIONS: &str = "nbhub_coap_retransmissions_total";
    pub const CON_TIMEOUTS: &str = "nbhub_coap_con_timeouts_total";
    pub const OUTGOING: &str = "nbhub_coap_outgoing";
    pub const OUTGOING_FULL: &str = "nbhub_coap_outgoing_full_total";
    pub const DEDUP_ENTRIES: &str = "nbhub_coap_dedup_entries";
    pub const DEDUP_EVICTIONS: &str = "nbhub_coap_dedup_evictions_total";
    pub const AUTH: &str = "nbhub_auth_total";
    pub const UPLINKS_STORED: &str = "nbhub_uplinks_stored_total";
    pub const FLOW_CONTROL: &str = "nbhub_flow_control_rejections_total";
    /// Device requests that changed nothing, by dialect and reason (`dialect::refusal`).
    pub const REFUSALS: &str = "nbhub_refusals_total";
    pub const PENDING_WRITES_FULL: &str = "nbhub_pending_writes_full_total";
    pub const STORE_COMMIT_SECONDS: &str = "nbhub_store_commit_seconds";
    pub const STORE_BATCH_JOBS: &str = "nbhub_store_batch_jobs";
    /// 1 while the store takes writes, 0 while its disk is full.
    pub const STORE_WRITABLE: &str = "nbhub_store_writable";
    /// Writes that failed without touching the data, by reason (`no_space`, `busy`), and state
    /// changes held for a full disk that had to be dropped (`held_overflow`).
    pub const STORE_WRITES_REFUSED: &str = "nbhub_store_writes_refused_total";
    /// RocksDB's memory by part (`memtables`, `block_cache`, `table_readers`), in bytes.
    pub const STORE_MEMORY_BYTES: &str = "nbhub_store_memory_bytes";
    pub const SESSIONS: &str = "nbhub_sessions";
    pub const DEVICES: &str = "nbhub_devices";
    pub const DTLS_HELLO_VERIFY: &str = "nbhub_dtls_hello_verify_requests_total";
    pub const DTLS_HANDSHAKES_STARTED: &str = "nbhub_dtls_handshakes_started_total";
    pub const DTLS_HANDSHAKES_COMPLETED: &str = "nbhub_dtls_handshakes_completed_total";
    pub const DTLS_HANDSHAKES_FAILED: &str = "nbhub_dtls_handshakes_failed_total";
    pub const DTLS_REFUSED: &str = "nbhub_dtls_refused_total";
    pub const DTLS_EVICTIONS: &str = "nbhub_dtls_evictions_total";
    pub const DTLS_CLOSED: &str = "nbhub_dtls_closed_by_peer_total";
    pub const DTLS_STRAY: &str = "nbhub_dtls_stray_datagrams_total";
    pub const DTLS_UNSENT: &str = "nbhub_dtls_unsent_responses_total";
    pub const DTLS_SESSIONS: &str = "nbhub_dtls_sessions";
    pub const DTLS_HANDSHAKES_IN_PROGRESS: &str = "nbhub_dtls_handshakes_in_progress";
    pub const DTLS_SESSIONS_WITH_CID: &str = "nbhub_dtls_sessions_with_cid";
    pub const DTLS_HANDSHAKES_WITH_CID: &str = "nbhub_dtls_handshakes_with_cid_total";
    pub const DTLS_ADDRESS_MOVES: &str = "nbhub_dtls_address_moves_total";
    pub const DTLS_REPLACED: &str = "nbhub_dtls_sessions_replaced_total";
    pub const DTLS_RESTORED: &str = "nbhub_dtls_sessions_restored_total";
    pub const DTLS_RESTORE_FAILURES: &str = "nbhub_dtls_session_restore_failures_total";
    pub const DTLS_RESUMED: &str = "nbhub_dtls_sessions_resumed_total";
    pub const DTLS_RESTORED_WAITING: &str = "nbhub_dtls_restored_sessions_waiting";
    pub const WEBHOOK_DELIVERIES: &str = "nbhub_webhook_deliveries_total";
    pub const WEBHOOK_DROPPED: &str = "nbhub_webhook_events_dropped_total";
    pub const OUTLET_PUBLISHED: &str = "nbhub_outlet_events_published_total";
    pub const OUTLET_ACKNOWLEDGED: &str = "nbhub_outlet_events_acknowledged_total";
    pub const OUTLET_FAILED: &str = "nbhub_outlet_publish_failures_total";
    pub const OUTLET_DROPPED: &str = "nbhub_outlet_events_dropped_total";
    /// Outbox events the outlet has not taken yet.
    pub const OUTLET_LAG_EVENTS: &str = "nbhub_outlet_lag_events";
    /// From an event's time (an uplink's acknowledgement) to the engine's acknowledgement of it.
    pub const OUTLET_LAG_SECONDS: &str = "nbhub_outlet_lag_seconds";
    pub const OUTLET_CONNECTED: &str = "nbhub_outlet_connected";
    pub const OUTLET_COMMANDS: &str = "nbhub_outlet_commands_total";
    pub const COMMANDS: &str = "nbhub_commands_total";
    pub const ADMIN_RESPONSES: &str = "nbhub_admin_responses_total";
    /// Commands refused because the device already had `downlink.max_pending` waiting.
    pub const COMMANDS_REFUSED: &str = "nbhub_commands_refused_total";
    pub const RESIDENT_BYTES: &str = "nbhub_process_resident_bytes";
    pub const OTA_CHUNKS: &str = "nbhub_ota_chunks_served_total";
    pub const OTA_DEVICES: &str = "nbhub_ota_devices";
    /// Devices a distribution task handled, by result (moved, failed, rolled_back, stayed).
    pub const DISTRIBUTED: &str = "nbhub_distribution_devices_total";
    pub const BOOTSTRAP: &str = "nbhub_bootstrap_total";
    pub const OTA_CELLS_SATURATED: &str = "nbhub_ota_cells_saturated";
    /// Uplinks a codec read, by outcome (`ok` or the error's kind: thrown, timeout, memory, …).
    pub const CODEC_DECODED: &str = "nbhub_codec_decoded_total";
    pub const CODEC_SECONDS: &str = "nbhub_codec_call_seconds";
    /// Script runtimes thrown away after a call ran past its time or memory budget.
    pub const CODEC_RUNTIMES_REBUILT: &str = "nbhub_codec_runtimes_rebuilt_total";
    /// `console.log` lines of scripts beyond the rate limit, not written.
    pub const CODEC_LOG_DROPPED: &str = "nbhub_codec_log_lines_dropped_total";
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// Logs to stderr: `filter` is an `EnvFilter` directive (`info`, `nbhub=debug`…).
pub fn init_logging(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Installs the process-wide Prometheus recorder; `None` if one is already installed.
pub fn init_metrics() -> Option<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0])
        .ok()?
        // An outlet's lag runs from milliseconds to the length of an engine's outage.
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(metric::OUTLET_LAG_SECONDS.into()),
            &[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0, 300.0],
        )
        .ok()?
        .install_recorder()
        .ok()?;
    metrics::describe_counter!(metric::DATAGRAMS_RECEIVED, "UDP datagrams received, by port");
    metrics::describe_counter!(metric::DATAGRAMS_SENT, "UDP datagrams sent, by port");
    metrics::describe_counter!(metric::MALFORMED, "datagrams that are not well-formed CoAP");
    metrics::describe_counter!(metric::DUPLICATES, "retransmitted requests answered from the dedup cache");
    metrics::describe_counter!(
        metric::RESPONSES,
        "responses sent, by code (the server's own requests are not counted)"
    );
    metrics::describe_counter!(metric::AUTH, "/auth and registration results");
    metrics::describe_counter!(metric::UPLINKS_STORED, "uplinks durably stored");
    metrics::describe_counter!(
        metric::FLOW_CONTROL,
        "requests over a device's flow-control budget, by action (refused with 4.29, or dropped unanswered)"
    );
    metrics::describe_counter!(metric::REFUSALS, "device requests refused or ignored, by dialect and reason");
    metrics::describe_counter!(metric::DTLS_HELLO_VERIFY, "stateless HelloVerifyRequests sent to new DTLS peers");
    metrics::describe_counter!(
        metric::DTLS_HANDSHAKES_STARTED,
        "DTLS handshakes started (ClientHello with a valid cookie)"
    );
    metrics::describe_counter!(metric::DTLS_HANDSHAKES_COMPLETED, "DTLS handshakes completed, by negotiated suite");
    metrics::describe_counter!(metric::DTLS_HANDSHAKES_FAILED, "DTLS handshakes or sessions that failed, by reason");
    metrics::describe_counter!(metric::DTLS_REFUSED, "valid ClientHellos dropped at a limit, by limit");
    metrics::describe_counter!(metric::DTLS_EVICTIONS, "DTLS sessions evicted, by reason");
    metrics::describe_counter!(metric::CON_TIMEOUTS, "CON messages the server sent that were never acknowledged");
    metrics::describe_counter!(metric::COMMANDS, "command state changes, by the state entered");
    metrics::describe_counter!(metric::WEBHOOK_DELIVERIES, "webhook POST attempts, by result");
    metrics::describe_counter!(metric::OUTLET_PUBLISHED, "events published to a streaming outlet (attempts)");
    metrics::describe_counter!(metric::OUTLET_ACKNOWLEDGED, "events a streaming outlet's engine acknowledged");
    metrics::describe_counter!(metric::OUTLET_FAILED, "publishes to a streaming outlet that failed or timed out");
    metrics::describe_counter!(metric::OUTLET_DROPPED, "events given up after the outlet's max_age_s unacknowledged");
    metrics::describe_gauge!(metric::OUTLET_LAG_EVENTS, "outbox events a streaming outlet has not taken yet");
    metrics::describe_histogram!(
        metric::OUTLET_LAG_SECONDS,
        "from an event to its acknowledgement by the outlet's engine"
    );
    metrics::describe_gauge!(metric::OUTLET_CONNECTED, "1 while a streaming outlet is connected to its engine");
    metrics::describe_counter!(
        metric::OUTLET_COMMANDS,
        "commands taken in through a streaming outlet, by answer status"
    );
    metrics::describe_counter!(metric::WEBHOOK_DROPPED, "events given up after webhooks.max_age_s undelivered");
    metrics::describe_counter!(metric::CODEC_DECODED, "uplinks read by their product's codec, by outcome");
    metrics::describe_histogram!(metric::CODEC_SECONDS, "time of one codec script call");
    metrics::describe_counter!(metric::CODEC_RUNTIMES_REBUILT, "script runtimes rebuilt after a stopped call");
    metrics::describe_counter!(metric::CODEC_LOG_DROPPED, "script console lines over the rate limit");
    metrics::describe_gauge!(metric::DTLS_SESSIONS, "established DTLS sessions");
    metrics::describe_gauge!(metric::DTLS_HANDSHAKES_IN_PROGRESS, "DTLS handshakes in progress");
    metrics::describe_gauge!(metric::DTLS_SESSIONS_WITH_CID, "established DTLS sessions with a Connection ID");
    metrics::describe_counter!(metric::DTLS_HANDSHAKES_WITH_CID, "DTLS handshakes completed with a Connection ID");
    metrics::describe_counter!(
        metric::DTLS_ADDRESS_MOVES,
        "DTLS sessions moved to a new address by an authenticated record carrying their Connection ID"
    );
    metrics::describe_counter!(metric::DTLS_REPLACED, "DTLS sessions ended because their device established a new one");
    metrics::describe_counter!(metric::DTLS_RESTORED, "DTLS sessions read back from the store at start");
    metrics::describe_counter!(
        metric::DTLS_RESTORE_FAILURES,
        "stored DTLS sessions that could not be restored, by reason (dropped from the store)"
    );
    metrics::describe_counter!(
        metric::DTLS_RESUMED,
        "restored DTLS sessions taken up by their device's next datagram: handshakes a restart did not cost"
    );
    metrics::describe_gauge!(
        metric::DTLS_RESTORED_WAITING,
        "restored DTLS sessions not yet taken up (their devices have not sent since the start)"
    );
    metrics::describe_histogram!(metric::STORE_COMMIT_SECONDS, "time to commit one group of writes");
    metrics::describe_histogram!(metric::STORE_BATCH_JOBS, "jobs per committed batch");
    metrics::describe_gauge!(metric::STORE_WRITABLE, "1 while the store takes writes, 0 while its disk is full");
    metrics::describe_counter!(
        metric::STORE_WRITES_REFUSED,
        "writes refused (no_space, busy) and held state changes dropped (held_overflow)"
    );
    Some(handle)
}

/// The process's resident memory, from `/proc/self/statm` (Linux; nothing elsewhere).
pub fn export_process_gauges() {
    let resident_pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()));
    if let Some(pages) = resident_pages {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
        metrics::gauge!(metric::RESIDENT_BYTES).set((pages * page) as f64);
    }
}
