//! Drives distribution tasks over HTTP: one worker per task with work, doing what
//! [`Distribution::next`](super::task::Distribution::next) asks (send the product, move a chunk of devices, ask
//! the destination which moved devices came online), so a destination that is slow or down only
//! holds up its own tasks. Also the operator's rollback, which asks the destination to give back
//! devices that never connected there.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::Cluster;
use super::PeerApi;
use super::distribution::{DistributionCell, task_ops};
use super::task::{Changed, DistributionId, DistributionStatus, EntryStatus, PeerFailure, Policy, Work};
use super::transfer::{
    ImportOutcome, ImportRequest, ImportResponse, ProductTransfer, ReleaseOutcome, ReleaseRequest, ReleaseResponse,
};
use crate::clock::UnixMs;
use crate::downlink::CommandId;
use crate::identity::Home;
use crate::identity::{DeviceName, InstanceName};
use crate::store::{Op, Store};
use crate::telemetry::metric;

/// Destination devices read per page when looking for the ones that came online.
const PAGE: usize = 1000;

/// Runs a worker for every task with work until `stop` flips. Workers stopped mid-move leave
/// their devices "leaving" in the store; the move is repeated at the next start.
pub async fn supervise(cluster: Arc<Cluster>, mut stop: watch::Receiver<bool>) -> std::io::Result<()> {
    let Some(mut runnable) = cluster.distribution.take_runnable() else { return Ok(()) };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(cluster.registry.config.cluster.request_timeout_ms))
        .build()
        .map_err(std::io::Error::other)?;
    let mut running: HashMap<DistributionId, Arc<DistributionCell>> = HashMap::new();
    let mut workers = JoinSet::new();
    let mut worker_of: HashMap<tokio::task::Id, DistributionId> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.changed() => {
                workers.shutdown().await;
                return Ok(());
            }
            Some(cell) = runnable.recv() => {
                let id = cell.lock().record.id;
                if let std::collections::hash_map::Entry::Vacant(slot) = running.entry(id) {
                    slot.insert(cell.clone());
                    let handle = workers.spawn(work(cluster.clone(), cell, client.clone()));
                    worker_of.insert(handle.id(), id);
                }
            }
            Some(done) = workers.join_next_with_id(), if !workers.is_empty() => {
                let worker = match done {
                    Ok((worker, _)) => worker,
                    Err(e) => {
                        tracing::error!(error = %e, "a distribution worker ended abnormally");
                        e.id()
                    }
                };
                let Some(id) = worker_of.remove(&worker) else { continue };
                // Reopened (retried) while its worker was finishing, or its worker died: run again.
                if let Some(cell) = running.remove(&id)
                    && cell.lock().record.status.is_open()
                {
                    running.insert(id, cell.clone());
                    let handle = workers.spawn(work(cluster.clone(), cell, client.clone()));
                    worker_of.insert(handle.id(), id);
                }
            }
        }
    }
}

/// Stores a step's changes (logged, not fatal: the task is in memory and retried).
async fn store(cluster: &Cluster, ops: Vec<Op>) -> bool {
    if ops.is_empty() {
        return true;
    }
    match cluster.registry.writer().commit(ops).await {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %e, "could not store a distribution task's progress");
            false
        }
    }
}

async fn work(cluster: Arc<Cluster>, cell: Arc<DistributionCell>, client: reqwest::Client) -> DistributionId {
    let cfg = &cluster.registry.config.cluster;
    let nearest_peers = cluster.peers.nearest_peers();
    loop {
        let now = UnixMs::now().0;
        let (id, work, ops) = {
            let mut task = cell.lock();
            let changed = task.advance(now);
            let ops = cluster.task_changes(&task, &changed);
            (task.record.id, task.next(now, cfg.import_chunk, cfg.poll_s * 1000, &nearest_peers), ops)
        };
        if !store(&cluster, ops).await {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        match work {
            Work::SendProduct(instances) => send_product(&cluster, &cell, &client, instances).await,
            Work::Move { instance, entries } => move_devices(&cluster, &cell, &client, instance, entries).await,
            Work::Poll { instance, entries } => poll(&cluster, &cell, &client, instance, entries).await,
            Work::Wait(until) => {
                if !cell.lock().record.status.is_open() {
                    return id;
                }
                let sleep = until.map_or(Duration::from_secs(3600), |t| Duration::from_millis(t.saturating_sub(now)));
                tokio::select! {
                    _ = cell.wake.notified() => {}
                    _ = tokio::time::sleep(sleep) => {}
                }
            }
        }
    }
}

/// A peer's admin API answered, or how it failed. A 4xx means it refused the request as a whole
/// and changed nothing (the API's rule for bad input); anything else after sending is unknown.
async fn call<T: DeserializeOwned>(
    client: &reqwest::Client,
    api: &PeerApi,
    method: reqwest::Method,
    path: &str,
    body: Option<&impl Serialize>,
) -> Result<T, PeerFailure> {
    let url = format!("{}{path}", api.url);
    let mut req = client.request(method, &url).bearer_auth(&api.token);
    if let Some(body) = body {
        req = req
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(body).expect("transfers serialise"));
    }
    let response = req.send().await.map_err(|e| {
        let m = format!("{url}: {e}");
        if e.is_connect() { PeerFailure::NotDelivered(m) } else { PeerFailure::Unknown(m) }
    })?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(|e| PeerFailure::Unknown(format!("{url}: {e}")))?;
    if status.is_client_error() {
        return Err(PeerFailure::NotDelivered(format!("{url} answered {status}: {}", String::from_utf8_lossy(&bytes))));
    }
    if !status.is_success() {
        return Err(PeerFailure::Unknown(format!("{url} answered {status}: {}", String::from_utf8_lossy(&bytes))));
    }
    serde_json::from_slice(&bytes).map_err(|e| PeerFailure::Unknown(format!("{url} answered unreadably: {e}")))
}

fn peer_api(cluster: &Cluster, instance: &InstanceName) -> Result<PeerApi, PeerFailure> {
    cluster
        .peers
        .peer(instance)
        .map(|p| p.api.clone())
        .ok_or_else(|| PeerFailure::NotDelivered(format!("instance {instance} is not a configured peer")))
}

fn product_of(cluster: &Cluster, cell: &DistributionCell) -> Result<ProductTransfer, PeerFailure> {
    let pk = cell.lock().record.product_key.clone();
    cluster
        .registry
        .product(pk.as_str())
        .map(|p| ProductTransfer::from(&*p))
        .ok_or_else(|| PeerFailure::NotDelivered(format!("product {pk} no longer exists here")))
}

async fn import(
    cluster: &Cluster,
    client: &reqwest::Client,
    instance: &InstanceName,
    req: &ImportRequest,
) -> Result<ImportResponse, PeerFailure> {
    let api = peer_api(cluster, instance)?;
    call(client, &api, reqwest::Method::POST, "/api/v1/distribution/imports", Some(req)).await
}

async fn send_product(
    cluster: &Cluster,
    cell: &DistributionCell,
    client: &reqwest::Client,
    instances: Vec<InstanceName>,
) {
    let mut result = product_of(cluster, cell).map(|product| ImportRequest {
        source: cluster.peers.name.clone(),
        product,
        devices: Vec::new(),
    });
    if let Ok(req) = &result {
        for instance in &instances {
            if let Err(f) = import(cluster, client, instance, req).await {
                result = Err(f);
                break;
            }
        }
    }
    if let Err(f) = &result {
        tracing::warn!(error = f.message(), "a distribution task could not send its product");
    }
    let ops = {
        let mut task = cell.lock();
        let changed = task.apply_product(result.map(|_| ()), UnixMs::now().0);
        cluster.task_changes(&task, &changed)
    };
    store(cluster, ops).await;
}

/// Moves a chunk: the devices are marked leaving (durably) before the destination hears of them,
/// so they are never served in two places.
async fn move_devices(
    cluster: &Cluster,
    cell: &DistributionCell,
    client: &reqwest::Client,
    instance: InstanceName,
    entries: Vec<usize>,
) {
    let now = UnixMs::now().0;
    let leaving_for = Home::Leaving(instance.clone());
    let (mut ops, mut transfers, mut moving, mut gone) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    {
        // Under the task's lock, so an operator's pause or cancel since `next` is honoured and a
        // cancel cannot slip in before the entries say they are moving.
        let mut task = cell.lock();
        if task.record.status != DistributionStatus::InProgress {
            return;
        }
        for i in entries {
            if !matches!(task.entries[i].status, EntryStatus::Pending | EntryStatus::Moving) {
                continue;
            }
            let device = cluster.registry.device_by_id(task.entries[i].device);
            match device.and_then(|d| cluster.begin_leaving(&d, leaving_for.clone()).map(|l| (d, l))) {
                Some((device, leaving)) => {
                    ops.extend(leaving.ops);
                    let sent: Vec<CommandId> = leaving.transfer.commands.iter().map(|c| c.id).collect();
                    transfers.push(leaving.transfer);
                    moving.push((i, device, leaving.resumed, sent));
                }
                None => gone.push(i),
            }
        }
        let moving_idx: Vec<usize> = moving.iter().map(|(i, ..)| *i).collect();
        let mut changed = task.set(&moving_idx, EntryStatus::Moving, Some(&instance), None, now);
        let failed = task.set(&gone, EntryStatus::Failed, None, Some("deleted, or no longer served here"), now);
        changed.entries.extend(failed.entries);
        ops.extend(cluster.task_changes(&task, &changed));
    }
    let moving_idx: Vec<usize> = moving.iter().map(|(i, ..)| *i).collect();
    // Devices an earlier attempt may have delivered: only the destination's answer settles them.
    let (uncertain, fresh): (Vec<_>, Vec<_>) = moving.iter().partition(|(_, _, resumed, _)| *resumed);
    let uncertain_idx: Vec<usize> = uncertain.iter().map(|(i, ..)| *i).collect();
    let fresh_idx: Vec<usize> = fresh.iter().map(|(i, ..)| *i).collect();
    if !store(cluster, ops).await {
        let mut ops: Vec<Op> = fresh.iter().flat_map(|(_, d, ..)| cluster.abort_leaving(d, &leaving_for)).collect();
        {
            let mut task = cell.lock();
            let failure = PeerFailure::NotDelivered("the move could not be stored here".into());
            let changed = task.apply_move_failure(&fresh_idx, &uncertain_idx, &failure, now);
            ops.extend(cluster.task_changes(&task, &changed));
        }
        store(cluster, ops).await;
        return;
    }
    if moving.is_empty() {
        return;
    }
    let result = match product_of(cluster, cell) {
        Ok(product) => {
            let req = ImportRequest { source: cluster.peers.name.clone(), product, devices: transfers };
            import(cluster, client, &instance, &req).await
        }
        Err(f) => Err(f),
    };
    let now = UnixMs::now().0;
    let mut ops = Vec::new();
    match result {
        Ok(response) => {
            let answers: HashMap<&DeviceName, _> = response.devices.iter().map(|r| (&r.device_name, r)).collect();
            let mut task = cell.lock();
            let mut changed = Changed::default();
            let mut unsettled = Vec::new();
            for (i, device, _, sent) in &moving {
                let (finished, moved) = match answers.get(&device.device_name) {
                    Some(answer) => cluster.finish_leaving(device, &instance, sent, answer),
                    None => (Vec::new(), false),
                };
                ops.extend(finished);
                let leaving = device.state().home == leaving_for;
                let (status, error) = match answers.get(&device.device_name) {
                    _ if moved => (EntryStatus::Moved, None),
                    _ if leaving => {
                        unsettled.push(*i);
                        continue;
                    }
                    Some(answer) if answer.result == ImportOutcome::Refused => {
                        (EntryStatus::Failed, answer.error.clone())
                    }
                    _ => (EntryStatus::Failed, Some("the device was no longer leaving".into())),
                };
                let label = if status == EntryStatus::Moved { "moved" } else { "failed" };
                metrics::counter!(metric::DISTRIBUTED, "result" => label).increment(1);
                changed.entries.extend(task.set(&[*i], status, None, error.as_deref(), now).entries);
            }
            if unsettled.is_empty() {
                task.answered();
            } else {
                let failure = PeerFailure::Unknown(format!("{instance} could not settle some devices yet"));
                let more = task.apply_move_failure(&[], &unsettled, &failure, now);
                changed.entries.extend(more.entries);
            }
            changed.record = true;
            tracing::info!(task = %task.record.id, %instance, devices = moving.len(), "devices moved");
            ops.extend(cluster.task_changes(&task, &changed));
        }
        Err(failure) => {
            tracing::warn!(%instance, error = failure.message(), "a distribution move failed");
            // A request that was not delivered reached nobody: fresh devices are served here
            // again. Anything else may have reached the destination: they all stay leaving.
            let (fresh_idx, uncertain_idx) = match failure {
                PeerFailure::NotDelivered(_) => {
                    for (_, device, ..) in &fresh {
                        ops.extend(cluster.abort_leaving(device, &leaving_for));
                    }
                    metrics::counter!(metric::DISTRIBUTED, "result" => "failed").increment(fresh.len() as u64);
                    (fresh_idx, uncertain_idx)
                }
                PeerFailure::Unknown(_) => (Vec::new(), moving_idx),
            };
            let mut task = cell.lock();
            let changed = task.apply_move_failure(&fresh_idx, &uncertain_idx, &failure, now);
            ops.extend(cluster.task_changes(&task, &changed));
        }
    }
    store(cluster, ops).await;
}

/// The names among `wanted` that the instance has seen online (a device it holds that has a
/// last contact).
async fn seen_at(
    cluster: &Cluster,
    client: &reqwest::Client,
    instance: &InstanceName,
    product_key: &str,
    wanted: &HashSet<DeviceName>,
) -> Result<HashSet<DeviceName>, PeerFailure> {
    let api = peer_api(cluster, instance)?;
    let mut seen = HashSet::new();
    let mut after = String::new();
    loop {
        let path = format!("/api/v1/products/{product_key}/devices?limit={PAGE}&after={after}");
        let page: serde_json::Value = call(client, &api, reqwest::Method::GET, &path, None::<&()>).await?;
        for d in page["devices"].as_array().into_iter().flatten() {
            if let Some(name) = d["device_name"].as_str().and_then(|n| DeviceName::new(n).ok())
                && !d["last_seen"].is_null()
                && wanted.contains(&name)
            {
                seen.insert(name);
            }
        }
        match page["next"].as_str() {
            Some(next) => after = next.to_string(),
            None => return Ok(seen),
        }
    }
}

async fn poll(
    cluster: &Cluster,
    cell: &DistributionCell,
    client: &reqwest::Client,
    instance: InstanceName,
    entries: Vec<usize>,
) {
    let (product_key, wanted) = {
        let task = cell.lock();
        (task.record.product_key.clone(), entries.iter().map(|&i| task.entries[i].device_name.clone()).collect())
    };
    let result = seen_at(cluster, client, &instance, product_key.as_str(), &wanted).await;
    let now = UnixMs::now().0;
    let ops = {
        let mut task = cell.lock();
        match result {
            Ok(seen) => {
                let idx: Vec<usize> =
                    entries.into_iter().filter(|&i| seen.contains(&task.entries[i].device_name)).collect();
                let changed = task.apply_seen(&idx, now);
                cluster.task_changes(&task, &changed)
            }
            Err(f) => {
                // Asked again after the poll interval; not a reason to fail the task.
                tracing::warn!(%instance, error = f.message(), "could not ask which moved devices came online");
                task.record.updated_at = now;
                Vec::new()
            }
        }
    };
    store(cluster, ops).await;
}

/// What a rollback did.
#[derive(Debug, Default, Serialize)]
pub struct Rollback {
    /// Taken back: served here again, with the commands they had there.
    pub rolled_back: usize,
    /// Connected at the destination already: they stay there.
    pub stayed: usize,
}

/// Pauses the task and takes back its moved devices that never connected at the destination:
/// the destination stops serving them and describes them, this instance stores them, and only
/// then does the destination forget them. Run again, it finishes what an interrupted run left.
pub async fn rollback(cluster: &Cluster, db: &Store, cell: &DistributionCell) -> Result<Rollback, PeerFailure> {
    let (instance, product_key, moved, taken_back, paused) = {
        let mut task = cell.lock();
        let Policy::Specified(instance) = task.record.policy.clone() else {
            return Err(PeerFailure::NotDelivered("only a task with the specified policy can be rolled back".into()));
        };
        if task.record.status == DistributionStatus::InProgress
            || task.record.status == DistributionStatus::Initializing
        {
            task.record.status = DistributionStatus::Paused;
        }
        // Where each device lives is the truth, whatever an interrupted run recorded.
        let elsewhere = |i: usize| {
            cluster
                .registry
                .device_by_id(task.entries[i].device)
                .is_some_and(|d| d.state().home == Home::Moved(instance.clone()))
        };
        let moved: Vec<(usize, DeviceName)> = (0..task.entries.len())
            .filter(|&i| elsewhere(i))
            .map(|i| (i, task.entries[i].device_name.clone()))
            .collect();
        // Taken back by an earlier run (and stored here): the destination may forget them.
        let here = |d| cluster.registry.device_by_id(d).is_some_and(|d| d.state().home.is_here());
        let taken_back: Vec<DeviceName> = task
            .entries
            .iter()
            .filter(|e| e.status == EntryStatus::RolledBack && here(e.device))
            .map(|e| e.device_name.clone())
            .collect();
        let paused = task_ops(&task, &Changed { record: true, entries: Vec::new() });
        (instance, task.record.product_key.clone(), moved, taken_back, paused)
    };
    store(cluster, paused).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(cluster.registry.config.cluster.request_timeout_ms))
        .build()
        .map_err(|e| PeerFailure::NotDelivered(e.to_string()))?;
    let api = peer_api(cluster, &instance)?;
    let release = |device_names: Vec<DeviceName>, confirm: bool| {
        let req = ReleaseRequest {
            source: cluster.peers.name.clone(),
            product_key: product_key.clone(),
            device_names,
            confirm,
        };
        let (client, api) = (&client, &api);
        async move {
            call::<ReleaseResponse>(client, api, reqwest::Method::POST, "/api/v1/distribution/releases", Some(&req))
                .await
        }
    };
    // What an earlier run took back but could not tell the destination to forget.
    for chunk in taken_back.chunks(cluster.registry.config.cluster.import_chunk) {
        release(chunk.to_vec(), true).await?;
    }
    let mut summary = Rollback::default();
    for chunk in moved.chunks(cluster.registry.config.cluster.import_chunk) {
        let response = release(chunk.iter().map(|(_, n)| n.clone()).collect(), false).await?;
        let index: HashMap<&DeviceName, usize> = chunk.iter().map(|(i, n)| (n, *i)).collect();
        let (mut back, mut stayed, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        for r in response.devices {
            let Some(&i) = index.get(&r.device_name) else { continue };
            match (r.result, r.device) {
                (ReleaseOutcome::Released, Some(device)) => back.push((i, device)),
                (ReleaseOutcome::Seen, _) => stayed.push(i),
                _ => gone.push(i),
            }
        }
        let product = product_of(cluster, cell)?;
        let returning: Vec<usize> = back.iter().map(|(i, _)| *i).collect();
        let devices = back.into_iter().map(|(_, d)| d).collect();
        let results = cluster
            .import(db, ImportRequest { source: instance.clone(), product, devices })
            .await
            .map_err(|e| PeerFailure::Unknown(format!("taking the devices back failed here: {e}")))?;
        let now = UnixMs::now().0;
        let mut confirmed = Vec::new();
        let ops = {
            let mut task = cell.lock();
            let mut changed = Changed { record: true, entries: Vec::new() };
            for (&i, r) in returning.iter().zip(&results) {
                let (status, error) = match r.result {
                    ImportOutcome::Imported | ImportOutcome::AlreadyHere => (EntryStatus::RolledBack, None),
                    ImportOutcome::Refused | ImportOutcome::Retry => (EntryStatus::Failed, r.error.clone()),
                };
                if status == EntryStatus::RolledBack {
                    summary.rolled_back += 1;
                    confirmed.push(task.entries[i].device_name.clone());
                    metrics::counter!(metric::DISTRIBUTED, "result" => "rolled_back").increment(1);
                }
                changed.entries.extend(task.set(&[i], status, None, error.as_deref(), now).entries);
            }
            changed.entries.extend(task.set(&stayed, EntryStatus::Seen, None, None, now).entries);
            let lost = format!("{instance} no longer has the device");
            changed.entries.extend(task.set(&gone, EntryStatus::Failed, None, Some(&lost), now).entries);
            summary.stayed += stayed.len();
            task.record.updated_at = now;
            task_ops(&task, &changed)
        };
        store(cluster, ops).await;
        if !confirmed.is_empty() {
            release(confirmed, true).await?;
        }
        if let Some(r) =
            results.iter().find(|r| !matches!(r.result, ImportOutcome::Imported | ImportOutcome::AlreadyHere))
        {
            // Not served anywhere until this is settled: say so, and a rerun finishes it.
            let why = r.error.as_deref().unwrap_or("not taken");
            return Err(PeerFailure::Unknown(format!("device {} could not be taken back here: {why}", r.device_name)));
        }
    }
    tracing::info!(%instance, rolled_back = summary.rolled_back, stayed = summary.stayed, "distribution rolled back");
    Ok(summary)
}
