//! Several nbhub instances sharing one fleet (SPEC §10, seeds 000 and 001): where a device lives
//! ([`Home`]), the configured peers and the "nearest" prefix table ([`Cluster`]), what travels
//! between instances ([`transfer`]), and distribution tasks ([`task`] is the state machine,
//! [`runner`] drives it over HTTP).

pub mod prefix;
pub mod runner;
pub mod task;
pub mod transfer;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::config::{ClusterConfig, PeerConfig};
use crate::identity::InstanceName;
use crate::net::Cidr;
use crate::store::records::PortFamily;
use prefix::PrefixTable;

/// Where a device is served. Only `Here` devices may authenticate; the others are answered by
/// bootstrap with their new home, so a device is never served by two instances at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "state", content = "instance")]
pub enum Home {
    #[default]
    Here,
    /// Being handed to the instance: refused here until it took the device (or the move failed).
    Leaving(InstanceName),
    /// Served by the instance.
    Moved(InstanceName),
    /// Being taken from another instance: not served until its record is stored (the stored
    /// record already says `Here`, so this is never stored).
    Arriving,
    /// Given back to the instance it came from (a rollback), until that instance confirms it
    /// stored it; then it is removed here.
    Released(InstanceName),
}

impl Home {
    pub fn is_here(&self) -> bool {
        matches!(self, Home::Here)
    }

    /// The instance the device lives at or is moving to; `None` for here.
    pub fn elsewhere(&self) -> Option<&InstanceName> {
        match self {
            Home::Here | Home::Arriving => None,
            Home::Leaving(i) | Home::Moved(i) | Home::Released(i) => Some(i),
        }
    }
}

/// Where devices reach an instance: a host and one port per listener family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoapEndpoint {
    pub host: String,
    pub coap: u16,
    pub aes: u16,
    pub dtls: u16,
}

impl CoapEndpoint {
    /// The port of the family a device asked on: a device on DTLS is sent to DTLS.
    pub fn port(&self, family: PortFamily) -> u16 {
        match family {
            PortFamily::Plain => self.coap,
            PortFamily::Aes => self.aes,
            PortFamily::Dtls => self.dtls,
        }
    }
}

/// A peer's admin API.
#[derive(Debug, Clone)]
pub struct PeerApi {
    pub url: String,
    pub token: String,
}

pub struct Peer {
    pub endpoint: CoapEndpoint,
    pub api: PeerApi,
}

/// This instance, its peers and the prefix table, from `[cluster]`.
pub struct Cluster {
    pub name: InstanceName,
    host: String,
    peers: HashMap<InstanceName, Peer>,
    nearest: PrefixTable<InstanceName>,
    /// This instance's endpoint, known once its ports are bound.
    own: OnceLock<CoapEndpoint>,
}

impl Cluster {
    /// From a validated configuration.
    pub fn new(c: &ClusterConfig) -> Cluster {
        let peer = |p: &PeerConfig| Peer {
            endpoint: CoapEndpoint { host: p.host.clone(), coap: p.coap_port, aes: p.aes_port, dtls: p.dtls_port },
            api: PeerApi { url: p.admin_url.trim_end_matches('/').to_string(), token: p.token.clone() },
        };
        Cluster {
            name: c.name.clone(),
            host: c.host.clone(),
            peers: c.peers.iter().map(|p| (p.name.clone(), peer(p))).collect(),
            nearest: PrefixTable::new(
                c.nearest.iter().map(|r| (Cidr::parse(&r.cidr).expect("validated"), r.instance.clone())),
            ),
            own: OnceLock::new(),
        }
    }

    /// Records the bound listeners; the configured host, else the CoAP listener's address.
    pub fn bound(&self, coap: SocketAddr, aes: SocketAddr, dtls: SocketAddr) {
        let host = match (&self.host, coap.ip()) {
            (h, _) if !h.is_empty() => h.clone(),
            (_, ip) if !ip.is_unspecified() => ip.to_string(),
            _ => {
                tracing::warn!(
                    "cluster.host is not set and CoAP listens on every address: /bootstrap cannot name this instance"
                );
                String::new()
            }
        };
        let _ = self.own.set(CoapEndpoint { host, coap: coap.port(), aes: aes.port(), dtls: dtls.port() });
    }

    pub fn is_self(&self, instance: &InstanceName) -> bool {
        *instance == self.name
    }

    pub fn peer(&self, instance: &InstanceName) -> Option<&Peer> {
        self.peers.get(instance)
    }

    /// Where devices reach `instance`, if it is known (and has a host).
    pub fn endpoint(&self, instance: &InstanceName) -> Option<&CoapEndpoint> {
        let e = if self.is_self(instance) { self.own.get()? } else { &self.peer(instance)?.endpoint };
        (!e.host.is_empty()).then_some(e)
    }

    /// The instance nearest `ip` by the prefix table, this one when no prefix matches.
    pub fn nearest(&self, ip: IpAddr) -> &InstanceName {
        self.nearest.lookup(ip).unwrap_or(&self.name)
    }

    /// Every other instance the prefix table names (where a "nearest" task sends the product).
    pub fn nearest_peers(&self) -> Vec<InstanceName> {
        let mut v: Vec<_> = self.peers.keys().filter(|p| self.nearest_names(p)).cloned().collect();
        v.sort();
        v
    }

    fn nearest_names(&self, instance: &InstanceName) -> bool {
        self.nearest.values().any(|v| v == instance)
    }
}
