//! How commands are kept: every command under `device id | command id` whatever its state, an
//! index from the command id alone to its device, and the keys of the open ones (all the server
//! reads at start). A command's change is counted and, when subscribers want it, announced in
//! the same write.

use super::command::{CommandId, CommandRecord, CommandView};
use crate::clock::UnixMs;
use crate::identity::DeviceId;
use crate::northbound::{Event, EventKind, Wanted};
use crate::store::{
    CF_COMMAND_IDS, CF_COMMANDS, CF_OPEN_COMMANDS, META_NEXT_COMMAND_ID, Op, Store, StoreError, corrupt, json, pair_key,
};
use crate::telemetry::metric;

/// `device id (BE) | command id (BE)`: a device's commands in creation order.
fn command_key(device: DeviceId, id: CommandId) -> [u8; 16] {
    pair_key(device.0, id.0)
}

/// A command created or changed: the whole record, whose status says whether it is open, and
/// its `command_status` event if `wanted`.
pub fn put_command(c: &CommandRecord, wanted: &Wanted) -> Vec<Op> {
    metrics::counter!(metric::COMMANDS, "status" => c.status.as_str()).increment(1);
    let key = command_key(c.device, c.id);
    let mut ops = Vec::with_capacity(5);
    ops.push(Op::put_json(CF_COMMANDS, key, c));
    ops.push(Op::Put {
        cf: CF_COMMAND_IDS,
        key: c.id.0.to_be_bytes().to_vec(),
        value: c.device.0.to_be_bytes().to_vec(),
    });
    ops.push(match c.status.is_open() {
        true => Op::Put { cf: CF_OPEN_COMMANDS, key: key.to_vec(), value: Vec::new() },
        false => Op::Delete { cf: CF_OPEN_COMMANDS, key: key.to_vec() },
    });
    ops.push(Op::RaiseCounter { key: META_NEXT_COMMAND_ID, to: c.id.0 + 1 });
    if wanted.wants(EventKind::CommandStatus) {
        ops.push(Op::Event(Box::new(status_event(c))));
    }
    ops
}

/// A deleted device's commands: `ids` are all of them.
pub fn delete_commands(device: DeviceId, ids: &[CommandId]) -> Vec<Op> {
    let (from, to) = (device.0.to_be_bytes().to_vec(), (device.0 + 1).to_be_bytes().to_vec());
    let mut ops = vec![
        Op::DeleteRange { cf: CF_COMMANDS, from: from.clone(), to: to.clone() },
        Op::DeleteRange { cf: CF_OPEN_COMMANDS, from, to },
    ];
    ops.extend(ids.iter().map(|id| Op::Delete { cf: CF_COMMAND_IDS, key: id.0.to_be_bytes().to_vec() }));
    ops
}

fn status_event(c: &CommandRecord) -> Event {
    let time = UnixMs([c.finished_at, c.delivered_at, c.sent_at].into_iter().flatten().max().unwrap_or(c.created_at));
    Event {
        kind: EventKind::CommandStatus,
        product_key: c.product_key.clone(),
        device_name: c.device_name.clone(),
        time,
        data: serde_json::to_value(CommandView::from(c.clone())).expect("a command serialises"),
    }
}

/// The first id not yet handed out, as stored.
pub fn next_id(store: &Store) -> Result<u64, StoreError> {
    Ok(store.meta_u64(META_NEXT_COMMAND_ID)?.unwrap_or(1))
}

/// Every open command, in id order per device.
pub fn open(store: &Store) -> Result<Vec<CommandRecord>, StoreError> {
    let keys = store.scan(CF_OPEN_COMMANDS, |k, _| Ok(k.to_vec()))?;
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        match store.get(CF_COMMANDS, &k)? {
            Some(v) => out.push(json(&k, &v)?),
            None => return Err(corrupt(&k, "open command without a record")),
        }
    }
    Ok(out)
}

pub fn get(store: &Store, id: CommandId) -> Result<Option<CommandRecord>, StoreError> {
    let key = id.0.to_be_bytes();
    let Some(device) = store.get(CF_COMMAND_IDS, &key)? else { return Ok(None) };
    let device = DeviceId(u64::from_be_bytes(device.as_slice().try_into().map_err(|_| corrupt(&key, "bad index"))?));
    let k = command_key(device, id);
    store.get(CF_COMMANDS, &k)?.map(|v| json(&k, &v)).transpose()
}

/// A device's commands, oldest first.
pub fn of(store: &Store, device: DeviceId) -> Result<Vec<CommandRecord>, StoreError> {
    store.scan_prefix(CF_COMMANDS, device.0, json)
}
