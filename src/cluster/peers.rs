//! This instance and its peers: where devices reach each, their admin APIs, and the "nearest"
//! prefix table.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use super::prefix::PrefixTable;
use crate::config::{ClusterConfig, PeerConfig};
use crate::identity::InstanceName;
use crate::net::Cidr;
use crate::net::PortFamily;

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
pub struct Peers {
    pub name: InstanceName,
    host: String,
    peers: HashMap<InstanceName, Peer>,
    nearest: PrefixTable<InstanceName>,
    /// This instance's endpoint, known once its ports are bound.
    own: OnceLock<CoapEndpoint>,
}

impl Peers {
    /// From a validated configuration.
    pub fn new(c: &ClusterConfig) -> Peers {
        let peer = |p: &PeerConfig| Peer {
            endpoint: CoapEndpoint { host: p.host.clone(), coap: p.coap_port, aes: p.aes_port, dtls: p.dtls_port },
            api: PeerApi { url: p.admin_url.trim_end_matches('/').to_string(), token: p.token.clone() },
        };
        Peers {
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

    /// Where devices reach this instance once its ports are bound, its host empty when neither
    /// `cluster.host` nor the CoAP listener names one.
    pub fn own(&self) -> Option<&CoapEndpoint> {
        self.own.get()
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
