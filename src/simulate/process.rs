//! An nbhub server run as a child process on loopback, for the soak and the benchmarks that
//! restart it: every port is picked by the kernel, the admin token is fixed, and the child dies
//! with its parent.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::AdminClient;

pub const ADMIN_TOKEN: &str = "simulated-admin-token";

/// The server process and where it listens now (ports change with every start).
pub struct ServerProcess {
    pub dir: PathBuf,
    /// Environment beyond the ports and the token (`NBHUB_...` settings).
    env: Vec<(String, String)>,
    child: Option<Child>,
    pub endpoints: crate::Endpoints,
}

impl ServerProcess {
    /// Starts `nbhub serve` (the binary beside this one) on `dir`/data, logging to
    /// `dir`/server.log, and waits until it serves (at most `within`).
    pub fn start(dir: &Path, env: &[(&str, &str)], within: Duration) -> Result<ServerProcess, String> {
        let a: std::net::SocketAddr = "0.0.0.0:0".parse().expect("an address");
        let mut p = ServerProcess {
            dir: dir.to_path_buf(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            child: None,
            endpoints: crate::Endpoints { coap: a, aes: a, dtls: a, admin: a },
        };
        p.spawn(within)?;
        Ok(p)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts the server again (after [`kill9`](Self::kill9)); how long until it served.
    pub fn spawn(&mut self, within: Duration) -> Result<Duration, String> {
        let data = self.data_dir();
        let _ = std::fs::remove_file(data.join(crate::ENDPOINTS_FILE));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .map_err(|e| format!("server.log: {e}"))?;
        let bin = std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("nbhub");
        let mut cmd = Command::new(bin);
        // The server dies with its parent on every way out.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd
            .arg("serve")
            .current_dir(&self.dir)
            .env("NBHUB_DATA_DIR", &data)
            .env("NBHUB_ADMIN_LISTEN", "127.0.0.1:0")
            .env("NBHUB_COAP_LISTEN", "127.0.0.1:0")
            .env("NBHUB_AES_LISTEN", "127.0.0.1:0")
            .env("NBHUB_DTLS_LISTEN", "127.0.0.1:0")
            // PSK only: no certificate needed.
            .env("NBHUB_DTLS_CERT", "")
            .env("NBHUB_DTLS_KEY", "")
            .env("NBHUB_DTLS_RSA_CERT", "")
            .env("NBHUB_DTLS_RSA_KEY", "")
            .env("NBHUB_ADMIN_TOKEN", ADMIN_TOKEN)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start nbhub (build it first): {e}"))?;
        self.child = Some(child);
        let deadline = started + within;
        loop {
            if let Ok(text) = std::fs::read_to_string(data.join(crate::ENDPOINTS_FILE))
                && let Ok(e) = serde_json::from_str(&text)
            {
                self.endpoints = e;
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                return Err(format!("nbhub did not start within {within:?}; see {}/server.log", self.dir.display()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The process's resident memory in bytes.
    pub fn rss(&self) -> Option<u64> {
        resident_bytes(self.pid()?)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn admin(&self) -> AdminClient {
        AdminClient::new(&format!("http://{}", self.endpoints.admin), ADMIN_TOKEN)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A process's resident memory in bytes, from `/proc`.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim();
    kb.parse::<u64>().ok().map(|kb| kb * 1024)
}
