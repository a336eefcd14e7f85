//! The thread both fakes (GitLab, GitHub) serve from: an axum app on
//! 127.0.0.1 (a port the kernel picks, held from bind to drop) in a runtime
//! of its own, stopped and joined on drop.

/// A running fake server.
pub struct ServerThread {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The server's runtime, for work the fake does on its own (webhooks).
    pub rt: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Serve `app` from a thread named `name`.
    pub fn start(name: &str, app: axum::Router) -> ServerThread {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let url = format!("http://{}", listener.local_addr().expect("an address"));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (rt_tx, rt_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("the fake server's runtime");
                let _ = rt_tx.send(rt.handle().clone());
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = stop_rx => {}
                    }
                });
                rt.shutdown_background();
            })
            .expect("start the fake server's thread");
        let rt = rt_rx.recv().expect("the fake server's runtime");
        ServerThread {
            url,
            rt,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
