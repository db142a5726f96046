//! Real `redis-server` processes on free ports, started and stopped by the
//! tests themselves: one server, or a three-master cluster.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tollgate::period::Period;

use super::eventually;

/// The billing period, anchored on the 1st, of [`super::run_started`].
pub fn this_period() -> Period {
    Period::containing(super::run_started(), 1)
}

/// The period after [`this_period`].
pub fn next_period() -> Period {
    Period::containing(this_period().end, 1)
}

/// The Redis key of `org`'s `dimension` counter in [`this_period`].
pub fn counter_key(org: &str, dimension: &str) -> String {
    format!("tollgate:{{{org}}}:{}:{dimension}", this_period().key())
}

pub struct RedisServer {
    pub port: u16,
    /// The user and password clients log in with, if the server asks.
    login: Option<(String, String)>,
    extra: Vec<String>,
    dir: TempDir,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        RedisServer::start_with(free_port(), Vec::new()).await
    }

    /// A server that keeps every write it acknowledged across a crash (an
    /// append-only file synced before each reply), and takes `DEBUG`: the
    /// setup under which a store outage can be measured to the last charge.
    pub async fn start_durable() -> RedisServer {
        let extra = [
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--enable-debug-command",
            "yes",
        ];
        RedisServer::start_with(free_port(), extra.map(String::from).to_vec()).await
    }

    /// A server that takes only clients logging in as `user` with
    /// `password` (an ACL user), or as the default user with the same
    /// password (`requirepass`).
    pub async fn start_with_login(user: &str, password: &str) -> RedisServer {
        let extra = ["--requirepass", password, "--user", user, "on"]
            .into_iter()
            .map(String::from)
            .chain([
                format!(">{password}"),
                "~*".into(),
                "&*".into(),
                "+@all".into(),
            ])
            .collect();
        let mut server = RedisServer {
            port: free_port(),
            login: Some((user.into(), password.into())),
            extra,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        server.spawn().await;
        server
    }

    /// A server that also listens on a unix socket; the socket's URL.
    pub async fn start_on_unix_socket() -> (RedisServer, String) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("redis.sock");
        let extra = vec!["--unixsocket".into(), socket.display().to_string()];
        let mut server = RedisServer {
            port: free_port(),
            login: None,
            extra,
            dir,
            child: None,
        };
        server.spawn().await;
        (server, format!("redis+unix://{}", socket.display()))
    }

    async fn start_with(port: u16, extra: Vec<String>) -> RedisServer {
        let mut server = RedisServer {
            port,
            login: None,
            extra,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        server.spawn().await;
        server
    }

    pub fn url(&self) -> String {
        match &self.login {
            Some((user, password)) => format!("redis://{user}:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.extra)
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: scripts/test installs it");
        self.child = Some(child);
        let url = self.url();
        eventually("redis-server answers PING", async || ping(&url)).await;
    }

    /// Sends the server process `signal` (`"STOP"`, `"CONT"`), as `kill` does.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("the server is running").id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// Kills the server (SIGKILL), as a crash does: its data is gone, but
    /// for what its append-only file holds if it writes one.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port: empty, or from its append-only
    /// file.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Runs one command and returns its reply.
    pub fn command<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        command(args).query(&mut self.connection()).unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut connection) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
        return false;
    };
    redis::cmd("PING").query::<String>(&mut connection).is_ok()
}

/// A port that is free now, and whose cluster bus port (+10000) is too.
fn free_port() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if port < 55000 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

/// Three masters sharing the 16384 slots, no replicas.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            ];
            nodes
                .push(RedisServer::start_with(free_port(), extra.map(String::from).to_vec()).await);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli is not installed: scripts/test installs it");
        assert!(status.success(), "redis-cli --cluster create failed");
        for node in &nodes {
            eventually("the cluster is ok on every node", async || {
                node.command::<String>(&["CLUSTER", "INFO"])
                    .contains("cluster_state:ok")
            })
            .await;
        }
        RedisCluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Runs one command on the node that holds its first key.
    pub fn command<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let client = redis::cluster::ClusterClient::new(self.urls()).unwrap();
        command(args)
            .query(&mut client.get_connection().unwrap())
            .unwrap()
    }
}

/// The command `args` spell, name first.
fn command(args: &[&str]) -> redis::Cmd {
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command
}

/// What [`CuttingProxy`] does to the next bytes of its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// The next request a client sends is dropped, with its connection:
    /// Redis never sees it.
    Request,
    /// The next reply Redis sends is dropped, with its connection: Redis
    /// ran the command, and the client never learns how it went.
    Reply,
}

/// A TCP proxy in front of a redis-server that passes bytes both ways until
/// told to cut a connection at its next request or reply.
pub struct CuttingProxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::Mutex<Option<Cut>>>,
}

impl CuttingProxy {
    pub async fn start(redis: &RedisServer) -> CuttingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::Mutex::new(None));
        let (target, shared) = (redis.port, cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let cut = shared.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let (from_client, to_client) = client.into_split();
                    let (from_server, to_server) = server.into_split();
                    // Either way ending drops all four halves: both connections close.
                    tokio::select! {
                        () = pass(from_client, to_server, Cut::Request, &cut) => {}
                        () = pass(from_server, to_client, Cut::Reply, &cut) => {}
                    }
                });
            }
        });
        CuttingProxy { port, cut }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn cut_next(&self, cut: Cut) {
        *self.cut.lock().unwrap() = Some(cut);
    }

    /// Whether the cut asked for was made.
    pub fn cut_made(&self) -> bool {
        self.cut.lock().unwrap().is_none()
    }
}

/// Copies `from` to `to` until either closes, or bytes come while `this`
/// cut is asked for.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    this: Cut,
    cut: &std::sync::Mutex<Option<Cut>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let Ok(read @ 1..) = from.read(&mut buffer).await else {
            return;
        };
        {
            let mut asked = cut.lock().unwrap();
            if *asked == Some(this) {
                *asked = None;
                return;
            }
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
