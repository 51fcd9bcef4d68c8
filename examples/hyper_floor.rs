//! The floor under fencegate's data plane, for bench/run.sh: the same HTTP stack (tokio, hyper's
//! HTTP/1 server, hyper-util's pooled client) forwarding every request as it came, with no
//! routing, fencing, header rewriting, request ids or metrics. Whatever fencegate costs above this
//! is fencegate's; what this costs above nginx is the stack's.
//!
//! `cargo run --release --example hyper_floor -- LISTEN UPSTREAM WORKER_THREADS`

use std::convert::Infallible;
use std::net::SocketAddr;

use http::Uri;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, threads] = args.as_slice() else {
        eprintln!("usage: hyper_floor LISTEN UPSTREAM_AUTHORITY WORKER_THREADS");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN is an IP:port address");
    let upstream = upstream.clone();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.parse().expect("WORKER_THREADS is a number"))
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(serve(listen, upstream));
}

async fn serve(listen: SocketAddr, upstream: String) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let listener = TcpListener::bind(listen).await.expect("LISTEN is free");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (client, upstream) = (client.clone(), upstream.clone());
        tokio::spawn(async move {
            let service = service_fn(move |mut request: http::Request<Incoming>| {
                let client = client.clone();
                let path = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
                let uri: Uri = format!("http://{upstream}{path}").parse().expect("a URI");
                *request.uri_mut() = uri;
                async move {
                    Ok::<_, Infallible>(match client.request(request).await {
                        Ok(response) => response.map(http_body_util::Either::Left),
                        Err(_) => http::Response::builder()
                            .status(502)
                            .body(http_body_util::Either::Right(http_body_util::Empty::<
                                bytes::Bytes,
                            >::new(
                            )))
                            .expect("a response"),
                    })
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
