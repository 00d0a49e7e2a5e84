//! A real `redis-server` for the cluster tests: started on a free loopback
//! port (installed first by `scripts/need-redis.sh` if missing), stopped
//! when dropped, and restartable on the same port.
//!
//! Under Wine (the Windows build) a Linux `redis-server` cannot be spawned
//! from the test: `scripts/test-windows.sh` starts one and passes its
//! address in `WHARF_TEST_REDIS`. The tests then share it, so each uses a
//! namespace of its own, and `stop` cuts the links of one namespace's
//! nodes (`CLIENT KILL ID`) instead of stopping the process.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    external: bool,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        if let Ok(addr) = std::env::var("WHARF_TEST_REDIS") {
            let port = addr.rsplit(':').next().unwrap().parse().unwrap();
            let s = RedisServer {
                port,
                child: None,
                external: true,
            };
            s.wait_ready();
            return s;
        }
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/need-redis.sh");
            let ok = Command::new("bash")
                .arg(script)
                .status()
                .map(|s| s.success());
            assert!(
                matches!(ok, Ok(true)),
                "redis-server is missing and {script} could not install it"
            );
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = RedisServer {
            port,
            child: None,
            external: false,
        };
        s.spawn();
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if self.query::<String>(&["PING"]).is_ok() {
                return;
            }
            assert!(
                Instant::now() < end,
                "redis-server on {} never answered",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs one command; its reply.
    pub fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.url())?;
        let mut con = client.get_connection_with_timeout(Duration::from_secs(1))?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut con)
    }

    /// Stops the broker (every link to it breaks) and keeps it down. A
    /// broker shared with other tests (`WHARF_TEST_REDIS`) is not stopped:
    /// the links of the nodes in `namespace` are cut instead (wharf names
    /// its connections `wharf-NAMESPACE-...`).
    pub fn stop(&mut self, namespace: &str) {
        if self.external {
            let clients: String = self.query(&["CLIENT", "LIST"]).unwrap_or_default();
            let mine = format!("name=wharf-{namespace}-");
            for line in clients.lines().filter(|l| l.contains(&mine)) {
                if let Some(id) = line.split(' ').find_map(|f| f.strip_prefix("id=")) {
                    let _ = self.query::<redis::Value>(&["CLIENT", "KILL", "ID", id]);
                }
            }
            return;
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn start_again(&mut self) {
        if !self.external {
            self.spawn();
        }
    }

    /// Whether `stop` really takes the broker away (not only its links).
    pub fn really_stops(&self) -> bool {
        !self.external
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
