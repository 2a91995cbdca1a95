//! Which socket task serves a device, so the admin API can hand it something to send now: an
//! `immediately` command must leave from the socket the device's NAT binding (and on 5684 its DTLS
//! session) belongs to.

use std::collections::HashMap;
use std::sync::RwLock;

use tokio::sync::mpsc;

use crate::identity::DeviceId;
use crate::net::PortFamily;
use crate::sync::{read, write};

/// One socket of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    pub family: PortFamily,
    pub socket: u16,
}

/// A socket task's inbox of devices that have something to be sent.
pub type Kicks = mpsc::UnboundedReceiver<DeviceId>;

#[derive(Default)]
pub struct Routes {
    senders: RwLock<HashMap<Route, mpsc::UnboundedSender<DeviceId>>>,
}

impl Routes {
    /// Registers a socket task; returns its inbox.
    pub fn open(&self, route: Route) -> Kicks {
        let (tx, rx) = mpsc::unbounded_channel();
        write(&self.senders).insert(route, tx);
        rx
    }

    /// Tells the socket task behind `route` that `device` has something to be sent.
    pub fn kick(&self, route: Route, device: DeviceId) {
        if let Some(tx) = read(&self.senders).get(&route) {
            let _ = tx.send(device);
        }
    }
}
