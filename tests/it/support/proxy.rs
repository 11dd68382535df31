//! A TCP front for an engine that a test can cut ([`EngineProxy`]): an engine that vanishes
//! mid-step.

/// A TCP front for an engine that a test can cut, as an engine that vanishes mid-pass (a daemon
/// restart, a remote host lost, an API server stopped). `DOCKER_HOST=tcp://127.0.0.1:PORT` points
/// berth at the Docker Engine through it; a kubeconfig with `server: https://127.0.0.1:PORT`
/// points it at the Kubernetes API server.
pub struct EngineProxy {
    /// The port it listens on.
    pub port: u16,
    pub(crate) open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub(crate) connections: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

/// A connection to the engine behind the front.
trait Upstream: std::io::Read + std::io::Write + Send + Sized + 'static {
    fn again(&self) -> Self;
    fn close(&self);
}

impl Upstream for std::os::unix::net::UnixStream {
    fn again(&self) -> Self {
        self.try_clone().unwrap()
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Upstream for std::net::TcpStream {
    fn again(&self) -> Self {
        self.try_clone().unwrap()
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl EngineProxy {
    /// Starts forwarding to `/var/run/docker.sock`.
    pub fn start() -> EngineProxy {
        EngineProxy::forwarding(|| std::os::unix::net::UnixStream::connect("/var/run/docker.sock"))
    }

    /// Starts forwarding to a TCP address (an API server).
    pub fn to_tcp(address: std::net::SocketAddr) -> EngineProxy {
        EngineProxy::forwarding(move || std::net::TcpStream::connect(address))
    }

    fn forwarding<U: Upstream>(
        connect: impl Fn() -> std::io::Result<U> + Send + 'static,
    ) -> EngineProxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (flag, held) = (open.clone(), connections.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !flag.load(Ordering::SeqCst) {
                    continue; // dropped: refused, as a dead engine would
                }
                let Ok(engine) = connect() else {
                    continue;
                };
                held.lock().unwrap().push(client.try_clone().unwrap());
                let (mut client_in, mut engine_out) = (client.try_clone().unwrap(), engine.again());
                let (mut engine_in, mut client_out) = (engine, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut client_in, &mut engine_out);
                    engine_out.close();
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut engine_in, &mut client_out);
                    let _ = client_out.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        EngineProxy {
            port,
            open,
            connections,
        }
    }

    /// `tcp://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Cuts every connection and refuses new ones, or lets them through again.
    pub fn set_open(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
        if !open {
            for connection in self.connections.lock().unwrap().drain(..) {
                let _ = connection.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}
