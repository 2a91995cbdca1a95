//! Many devices created as one (a bulk import): checked against the directory and each other
//! under one lock, stored in one write, and served only if all of them are stored.

use std::collections::HashSet;
use std::sync::Arc;

use super::{Device, NewDevice, Registry, RegistryError};
use crate::identity::ProductKey;
use crate::store::Op;
use crate::store::records::Radio;
use crate::sync::write;

/// Why nothing was created.
#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    /// Rows that clash with devices here, by the line the caller gave each.
    #[error("{} rows clash with devices here", .0.len())]
    Rows(Vec<(usize, String)>),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl Registry {
    /// Creates every device of `rows` (each with the line it came from) or none. The write is
    /// one batch: RocksDB applies it whole or not at all, so a failure leaves nothing behind.
    pub async fn create_devices(
        &self,
        pk: &ProductKey,
        rows: Vec<(usize, NewDevice, Radio)>,
    ) -> Result<Vec<Arc<Device>>, BulkError> {
        if self.product(pk.as_str()).is_none() {
            return Err(RegistryError::NotFound(format!("product {pk}")).into());
        }
        let made: Vec<(usize, Arc<Device>)> = rows
            .into_iter()
            .map(|(line, new, radio)| {
                (line, Arc::new(Device::from_record(self.new_record(pk, new, radio), None, None)))
            })
            .collect();
        {
            let mut devices = write(&self.devices);
            let mut clashes = Vec::new();
            let (mut names, mut nodes) = (HashSet::new(), HashSet::new());
            let existing = devices.by_product.get(pk);
            for (line, d) in &made {
                if existing.is_some_and(|m| m.contains_key(&d.device_name)) || !names.insert(&d.device_name) {
                    clashes.push((*line, format!("device {} already exists in product {pk}", d.device_name)));
                }
                if let Some(n) = &d.node_id
                    && (devices.by_node.contains_key(n) || !nodes.insert(n))
                {
                    clashes.push((*line, format!("node id {n} is already used by another device")));
                }
            }
            if !clashes.is_empty() {
                return Err(BulkError::Rows(clashes));
            }
            for (_, d) in &made {
                devices.insert(d);
            }
        }
        let ops: Vec<Op> = made.iter().map(|(_, d)| Op::PutDevice(d.clone())).collect();
        if let Err(e) = self.writer.commit(ops).await {
            for (_, d) in &made {
                self.forget(d);
            }
            return Err(RegistryError::from(e).into());
        }
        self.export_gauges();
        Ok(made.into_iter().map(|(_, d)| d).collect())
    }
}
