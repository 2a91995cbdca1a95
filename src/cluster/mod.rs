//! Several nbhub instances sharing one fleet (SPEC §10, seeds 000 and 001), built on the
//! registry: the configured peers and the "nearest" prefix table ([`peers`]), what travels
//! between instances ([`transfer`]), distribution tasks ([`task`] is the state machine,
//! [`distribution`] the tasks and the hand-off of devices, [`runner`] drives them over HTTP).

pub mod distribution;
pub mod peers;
pub mod prefix;
pub mod runner;
pub mod stored;
pub mod task;
pub mod transfer;

use std::sync::Arc;

use crate::downlink::Commands;
use crate::ota::campaign::Campaign;
use crate::registry::Registry;
use crate::store::{Store, StoreError};
pub use peers::{CoapEndpoint, Peer, PeerApi, Peers};

/// The cluster service: this instance's part in moving devices between instances.
pub struct Cluster {
    pub registry: Arc<Registry>,
    /// The queues that travel with their devices.
    pub commands: Arc<Commands>,
    /// What a device given back leaves behind of its upgrades.
    pub campaign: Arc<Campaign>,
    pub peers: Peers,
    pub distribution: distribution::Distributions,
    /// Where the shadows that travel with their devices are read.
    store: Store,
}

impl Cluster {
    /// The peers from the registry's configuration and the distribution tasks from its store.
    pub fn load(
        registry: Arc<Registry>,
        commands: Arc<Commands>,
        campaign: Arc<Campaign>,
        store: &Store,
    ) -> Result<Cluster, StoreError> {
        let distribution = distribution::Distributions::load(store)?;
        Ok(Cluster { distribution, ..Cluster::new(registry, commands, campaign, store.clone()) })
    }

    /// The peers from the registry's configuration, and no distribution tasks yet.
    pub fn new(registry: Arc<Registry>, commands: Arc<Commands>, campaign: Arc<Campaign>, store: Store) -> Cluster {
        let peers = Peers::new(&registry.config.cluster);
        Cluster { registry, commands, campaign, peers, distribution: distribution::Distributions::default(), store }
    }
}
