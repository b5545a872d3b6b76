//! A real `redis-server` for the cluster tests, on a free port with nothing persisted, in a
//! temporary directory; stopped when dropped. `scripts/install-deps.sh` installs it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// TLS only (`--port 0 --tls-port <port>`): the certificate, key and CA files.
    tls: Option<[std::path::PathBuf; 3]>,
}

impl RedisServer {
    /// Starts redis-server and waits until it answers `PING`.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut redis = RedisServer {
            child: None,
            port: free_port(),
            dir,
            tls: None,
        };
        redis.launch();
        redis
    }

    /// Starts redis-server speaking only TLS, with the PEM certificate `cert` (for
    /// `localhost`) and its `key`; `ca` is the CA file redis-cli checks it with.
    pub fn start_tls(cert: &str, key: &str, ca: &str) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = ["cert.pem", "key.pem", "ca.pem"].map(|name| dir.path().join(name));
        for (path, text) in files.iter().zip([cert, key, ca]) {
            std::fs::write(path, text).expect("tls file");
        }
        let mut redis = RedisServer {
            child: None,
            port: free_port(),
            dir,
            tls: Some(files),
        };
        redis.launch();
        redis
    }

    /// `redis://127.0.0.1:<port>/0`, or `rediss://localhost:<port>/0` with TLS.
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("rediss://localhost:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("redis.log")).expect("redis log");
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some([cert, key, ca]) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "no"]),
        };
        let child = command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(log.try_clone().expect("redis log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot start redis-server: run scripts/install-deps.sh");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let pong = match self.tls {
                None => self.command("PING").as_deref() == Some("+PONG"),
                Some(_) => self.cli(&["ping"]).trim() == "PONG",
            };
            if pong {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server never answered on port {}", self.port);
    }

    /// Stops the server (its data is lost: nothing is persisted).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends the server `signal` (`"STOP"` hangs it, `"CONT"` lets it go on).
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status()
                .expect("kill");
            assert!(status.success(), "kill -{signal}");
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Sends one inline command and returns the first line of the answer.
    pub fn command(&self, line: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(format!("{line}\r\n").as_bytes()).ok()?;
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]);
        text.lines().next().map(str::to_string)
    }

    /// What `redis-cli -p <port> <args>` prints.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut command = Command::new("redis-cli");
        command.args(["-p", &self.port.to_string()]);
        if let Some([_, _, ca]) = &self.tls {
            command
                .args(["-h", "localhost", "--tls", "--cacert"])
                .arg(ca);
        }
        let out = command.args(args).output().expect("cannot run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real Redis Cluster: `masters` redis-servers with `--cluster-enabled yes` on free ports,
/// joined by `redis-cli --cluster create` (no replicas); stopped when dropped.
pub struct RedisCluster {
    nodes: Vec<Child>,
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            ports: Vec::new(),
            _dir: dir,
        };
        for i in 0..masters {
            let port = cluster_node_port();
            let node_dir = cluster._dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let log = std::fs::File::create(node_dir.join("redis.log")).expect("redis log");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(log.try_clone().expect("redis log"))
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .expect("cannot start redis-server");
            cluster.nodes.push(child);
            cluster.ports.push(port);
        }
        for &port in &cluster.ports {
            let deadline = Instant::now() + Duration::from_secs(10);
            while ping(port).as_deref() != Some("+PONG") {
                assert!(
                    Instant::now() < deadline,
                    "redis node {port} never answered"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addresses: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("cannot run redis-cli");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        // Wait until every node sees the cluster as ok.
        let deadline = Instant::now() + Duration::from_secs(15);
        for &port in &cluster.ports {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster never became ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// The seed nodes as a TOML list.
    pub fn seeds_toml(&self) -> String {
        let seeds: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("\"redis://127.0.0.1:{p}\""))
            .collect();
        format!("[{}]", seeds.join(", "))
    }
}

/// A free port for a cluster node whose bus port (the port + 10000, which Redis opens too)
/// is free as well: Redis refuses node ports above 55535, and the system's ephemeral range
/// reaches 60999.
fn cluster_node_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

fn ping(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"PING\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).ok()?;
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .map(str::to_string)
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
