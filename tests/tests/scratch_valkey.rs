use keel_tests::KeelPrimary;
use keel_tests::Server;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scratch() {
    let p = KeelPrimary::start(Server::Valkey, 1, &[]).await;
    eprintln!("ADDR {}", p.addr());
    std::thread::sleep(std::time::Duration::from_secs(120));
}
