//! `start_call` against a real HTTP/2 server that answers a status other
//! than 200 with no gRPC status: the caller gets a status that names the
//! call and the HTTP status, not a response whose body it would try to
//! decode as gRPC messages.

use std::time::Duration;

use tokio::net::TcpListener;

/// Serves one connection: every request is answered with `status` and an
/// empty body, without any `grpc-status` header.
async fn answer_with(listener: TcpListener, status: http::StatusCode) {
    let Ok((socket, _)) = listener.accept().await else {
        return;
    };
    let Ok(mut connection) = h2::server::handshake(socket).await else {
        return;
    };
    while let Some(Ok((_request, mut respond))) = connection.accept().await {
        let response = http::Response::builder().status(status).body(()).unwrap();
        let _ = respond.send_response(response, true);
    }
}

#[tokio::test]
async fn a_call_answered_with_http_503_fails_with_a_status_that_says_so() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(answer_with(listener, http::StatusCode::SERVICE_UNAVAILABLE));
    let channel = zebu_proto::replica_endpoint(&addr, Duration::from_secs(10))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let body = tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::new()));
    let err = zebu_proto::start_call(
        channel,
        zebu_proto::wire::IO_PATH,
        &[],
        body,
        "the test call",
    )
    .await
    .expect_err("a 503 answer must not be taken for a gRPC response");
    assert_eq!(err.code(), tonic::Code::Unknown, "{err:?}");
    assert!(
        err.message().contains("opening the test call")
            && err.message().contains("HTTP status 503"),
        "{}",
        err.message()
    );
    server.abort();
}
