//! One plain connection to a single Redis server, for one sender task's
//! script calls, which go one at a time: a command written into a reused
//! buffer, its one reply read into another ([`resp`](super::resp)). Made on
//! first use and after any error, logging in and choosing the database as
//! the store's URL says, as the crate's own connection does (AUTH with the
//! username, again without it for a server that takes no usernames, then
//! SELECT). It speaks RESP2 whatever protocol the URL asks for: every reply
//! it reads is a string, the same in both.

use std::io;
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::resp::{self, Command, Frame, Kind, Malformed};

/// How a call failed, which decides whether its outcome must be asked for.
#[derive(Debug)]
pub enum Failure {
    /// Nothing of the call reached Redis: it did not run. `io`: because the
    /// connection could not be made (or failed before the call was
    /// written), so that trying again later may get through.
    Unsent { io: bool, message: String },
    /// The connection failed once the call was written: Redis may have run
    /// it, and its reply is lost.
    Lost(String),
    /// Redis answered with an error, or with what is no reply to the call.
    Answered(String),
}

impl Failure {
    /// Whether a later try may get through: the connection failed.
    pub fn may_pass(&self) -> bool {
        matches!(self, Failure::Lost(_) | Failure::Unsent { io: true, .. })
    }

    pub fn message(&self) -> &str {
        match self {
            Failure::Unsent { message, .. }
            | Failure::Lost(message)
            | Failure::Answered(message) => message,
        }
    }
}

/// Bytes read at a time; a reply is usually a few dozen.
const READ_CHUNK: usize = 4096;

/// A script to run: `EVALSHA` and its SHA1, encoded, and its text for when
/// Redis has not got it.
pub struct Script<'a> {
    pub evalsha: &'a [u8],
    pub code: &'a str,
}

pub struct Wire {
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    connect_timeout: Duration,
    stream: Option<TcpStream>,
    out: Vec<u8>,
    input: Vec<u8>,
}

impl Wire {
    /// A connection to `info`'s server, made when first used; `None` for an
    /// address this connection does not serve (a unix socket, TLS).
    pub fn new(info: &ConnectionInfo, connect_timeout: Duration) -> Option<Wire> {
        let ConnectionAddr::Tcp(host, port) = info.addr() else {
            return None;
        };
        let settings = info.redis_settings();
        Some(Wire {
            host: host.clone(),
            port: *port,
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
            db: settings.db(),
            connect_timeout,
            stream: None,
            out: Vec::with_capacity(READ_CHUNK),
            input: Vec::with_capacity(READ_CHUNK),
        })
    }

    /// Runs `script` by EVALSHA with `numkeys` keys and whatever `write`
    /// adds after them (the keys, then the arguments), loading the script
    /// if Redis has not got it; `read` takes the reply's text.
    pub async fn eval<R>(
        &mut self,
        script: &Script<'_>,
        numkeys: usize,
        write: impl FnOnce(&mut Command<'_>),
        read: impl FnOnce(&str) -> R,
    ) -> Result<R, Failure> {
        let mut stream = self.ready().await?;
        self.out.clear();
        let mut command = Command::new(&mut self.out);
        command
            .encoded(script.evalsha, 2)
            .int(i64::try_from(numkeys).unwrap_or(i64::MAX));
        write(&mut command);
        let start = command.finish();
        let end = self.out.len();
        let mut frame = self.sent(&mut stream, start..end).await?;
        if frame.kind == Kind::Error && self.input[frame.text.clone()].starts_with(b"NOSCRIPT") {
            self.load(&mut stream, script.code).await?;
            self.out.truncate(end);
            frame = self.sent(&mut stream, start..end).await?;
        }
        // A whole reply was read: the connection is ready for the next call.
        self.stream = Some(stream);
        let text = std::str::from_utf8(&self.input[frame.text.clone()]);
        match (frame.kind, text) {
            (Kind::Bulk | Kind::Simple, Ok(text)) => Ok(read(text)),
            (Kind::Error, Ok(text)) => Err(Failure::Answered(text.to_owned())),
            (Kind::Nil, _) => Err(Failure::Answered("Redis answered nil".into())),
            (_, Err(_)) => Err(Failure::Answered("Redis answered what is not UTF-8".into())),
        }
    }

    /// The call in `out[range]`, sent, and its reply; any failure of the
    /// connection now means the call may have run.
    async fn sent(
        &mut self,
        stream: &mut TcpStream,
        range: std::ops::Range<usize>,
    ) -> Result<Frame, Failure> {
        match exchange(stream, &self.out[range], &mut self.input).await {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(malformed)) => Err(Failure::Answered(malformed.to_string())),
            Err(error) => Err(Failure::Lost(error.to_string())),
        }
    }

    /// Loads `code` with SCRIPT LOAD, after the call waiting in `out`.
    async fn load(&mut self, stream: &mut TcpStream, code: &str) -> Result<(), Failure> {
        let mut command = Command::new(&mut self.out);
        command.bulk(b"SCRIPT").bulk(b"LOAD").bulk(code.as_bytes());
        let start = command.finish();
        let frame = match exchange(stream, &self.out[start..], &mut self.input).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(malformed)) => return Err(Failure::Answered(malformed.to_string())),
            Err(error) => return Err(unsent_io(&error)),
        };
        match frame.kind {
            Kind::Bulk => Ok(()),
            _ => Err(Failure::Answered(format!(
                "Redis did not load a script: {}",
                String::from_utf8_lossy(&self.input[frame.text])
            ))),
        }
    }

    /// The connection, made anew if there is none or Redis has closed it
    /// (after a restart, say), so that an idle connection's end does not
    /// fail the next call.
    async fn ready(&mut self) -> Result<TcpStream, Failure> {
        if let Some(stream) = self.stream.take() {
            match stream.try_read(&mut [0; 1]) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(stream),
                // Closed, failed, or sending what no call asked for.
                _ => drop(stream),
            }
        }
        match tokio::time::timeout(self.connect_timeout, self.connect()).await {
            Ok(connected) => connected,
            Err(_) => Err(Failure::Unsent {
                io: true,
                message: "connecting to Redis timed out".into(),
            }),
        }
    }

    async fn connect(&mut self) -> Result<TcpStream, Failure> {
        let mut stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|error| unsent_io(&error))?;
        stream
            .set_nodelay(true)
            .map_err(|error| unsent_io(&error))?;
        if let Some(password) = self.password.clone() {
            self.log_in(&mut stream, &password).await?;
        }
        if self.db != 0 {
            let db = self.db.to_string();
            if let Some(error) = self.setup(&mut stream, &[b"SELECT", db.as_bytes()]).await? {
                return Err(Failure::Unsent {
                    io: false,
                    message: format!("Redis refused to switch database: {error}"),
                });
            }
        }
        Ok(stream)
    }

    /// AUTH with the URL's username if it has one, and again without it
    /// for a server before ACLs, which takes no username.
    async fn log_in(&mut self, stream: &mut TcpStream, password: &str) -> Result<(), Failure> {
        let password = password.as_bytes();
        let mut refused = match self.username.clone() {
            Some(username) => {
                let auth: [&[u8]; 3] = [b"AUTH", username.as_bytes(), password];
                self.setup(stream, &auth).await?
            }
            None => self.setup(stream, &[b"AUTH", password]).await?,
        };
        if refused
            .as_ref()
            .is_some_and(|error| error.contains("wrong number of arguments for 'auth' command"))
        {
            refused = self.setup(stream, &[b"AUTH", password]).await?;
        }
        match refused {
            None => Ok(()),
            Some(_) => Err(Failure::Unsent {
                io: false,
                message: "Redis refused the password".into(),
            }),
        }
    }

    /// Sends one setup command; the error Redis answered, if it did.
    async fn setup(
        &mut self,
        stream: &mut TcpStream,
        items: &[&[u8]],
    ) -> Result<Option<String>, Failure> {
        self.out.clear();
        let mut command = Command::new(&mut self.out);
        for item in items {
            command.bulk(item);
        }
        let start = command.finish();
        let frame = match exchange(stream, &self.out[start..], &mut self.input).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(malformed)) => {
                return Err(Failure::Unsent {
                    io: false,
                    message: malformed.to_string(),
                });
            }
            Err(error) => return Err(unsent_io(&error)),
        };
        Ok(match frame.kind {
            Kind::Simple => None,
            _ => Some(String::from_utf8_lossy(&self.input[frame.text]).into_owned()),
        })
    }
}

fn unsent_io(error: &io::Error) -> Failure {
    Failure::Unsent {
        io: true,
        message: format!("Redis connection failed: {error}"),
    }
}

/// Writes `command` and reads one reply into `input`.
async fn exchange(
    stream: &mut TcpStream,
    command: &[u8],
    input: &mut Vec<u8>,
) -> io::Result<Result<Frame, Malformed>> {
    stream.write_all(command).await?;
    input.clear();
    loop {
        match resp::parse(input) {
            Ok(Some(frame)) => return Ok(Ok(frame)),
            Ok(None) => {}
            Err(malformed) => return Ok(Err(malformed)),
        }
        input.reserve(READ_CHUNK);
        if stream.read_buf(input).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}
