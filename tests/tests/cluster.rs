//! Cluster mode against a real 3-member etcd cluster on 127.0.0.1: three llmd instances
//! share one rotating login (3-second tokens, single-use refresh tokens) while the owner is
//! killed, paused past its lease, an etcd member dies and one llmd is cut off from etcd.
//! `LLMD_CLUSTER_SECS` makes the agents loop longer (default 60 s, the CI variant).

use llmd_client::Client;
use llmd_proto::methods::ClusterStatus;
use llmd_tests::etcd::{etcd_binary, EtcdCluster, Proxy};
use llmd_tests::fake_oauth::{access_of, presented_refresh_tokens, refresh_of, FakeOAuth};
use llmd_tests::Daemon;
use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LEASE_SECS: u64 = 2;
/// Ownership must pass within the lease plus this.
const TAKEOVER_MARGIN: Duration = Duration::from_secs(6);
const SEAL_KEY_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn bundle(access: &str, refresh: &str, expires_at: i64) -> String {
    json!({"access_token": access, "refresh_token": refresh, "expires_at": expires_at}).to_string()
}

fn config(fake: &FakeOAuth, name: &str, endpoints: &[String]) -> String {
    let etcd: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        r#"
[cluster]
etcd = [{}]
name = "{name}"
prefix = "/llmd/test/"
lease_secs = {LEASE_SECS}
seal_key_file = "{{home}}/seal.key"

[profiles.shared]
provider = "anthropic"
auth = "oauth"
token_endpoint = "{}"
cluster = true
"#,
        etcd.join(", "),
        fake.anthropic_url()
    )
}

fn start_node(fake: &FakeOAuth, name: &str, endpoints: &[String], planted: Option<&str>) -> Daemon {
    let mut b = Daemon::builder()
        .config(&config(fake, name, endpoints))
        .file("seal.key", SEAL_KEY_HEX, 0o600);
    if let Some(p) = planted {
        b = b.file("state/llmd/oauth/shared.json", p, 0o600);
    }
    b.start()
}

async fn cluster_status(d: &Daemon) -> Option<ClusterStatus> {
    let c = tokio::time::timeout(Duration::from_secs(2), Client::connect_to(&d.socket))
        .await
        .ok()?
        .ok()?;
    let s = tokio::time::timeout(Duration::from_secs(2), c.status())
        .await
        .ok()?
        .ok()?;
    s.profiles.into_iter().find(|p| p.name == "shared")?.cluster
}

/// Waits until one of `nodes` (by index, skipping `except`) reports itself owner.
async fn wait_owner(nodes: &[Daemon], except: Option<usize>, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        for (i, d) in nodes.iter().enumerate() {
            if Some(i) == except {
                continue;
            }
            if cluster_status(d).await.is_some_and(|c| c.role == "owner") {
                return i;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no instance took over the login within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn all_logs(nodes: &[Daemon]) -> String {
    nodes
        .iter()
        .enumerate()
        .map(|(i, d)| format!("--- node{i}:\n{}", d.logs()))
        .collect()
}

/// What one agent saw.
#[derive(Default)]
struct Served {
    ok: Vec<(String, i64)>,
    errors: u64,
}

fn agent(socket: std::path::PathBuf, stop: Arc<AtomicBool>, out: Arc<Mutex<Served>>) {
    tokio::spawn(async move {
        let mut client: Option<Client> = None;
        while !stop.load(Ordering::Relaxed) {
            if client.is_none() {
                client = tokio::time::timeout(Duration::from_secs(1), Client::connect_to(&socket))
                    .await
                    .ok()
                    .and_then(Result::ok);
            }
            if let Some(c) = &client {
                match tokio::time::timeout(Duration::from_secs(2), c.token("shared", Some(1))).await {
                    Ok(Ok(t)) => {
                        let served_at = now();
                        out.lock().unwrap().ok.push((t.token.clone(), served_at));
                    }
                    Ok(Err(llmd_client::Error::Rpc(_))) => out.lock().unwrap().errors += 1,
                    _ => {
                        out.lock().unwrap().errors += 1;
                        client = None;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_one_login_through_crashes_pauses_and_partitions() {
    let Some(bin) = etcd_binary() else {
        eprintln!("SKIP: `etcd` is not installed (Debian: apt-get install etcd-server)");
        return;
    };
    let total = Duration::from_secs(
        std::env::var("LLMD_CLUSTER_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let mut etcd = tokio::task::block_in_place(|| EtcdCluster::start(bin));
    let fake = FakeOAuth::start(3).await;
    let direct = etcd.endpoints();
    // Node 2 reaches etcd only through proxies, so it can be cut off.
    let mut proxies = Vec::new();
    for port in etcd.client_ports() {
        proxies.push(Proxy::start(port).await);
    }
    let proxied: Vec<String> = proxies
        .iter()
        .map(|p| format!("http://127.0.0.1:{}", p.port))
        .collect();
    let planted_expiry = now() + 3;
    let planted = bundle(&access_of(0), &refresh_of(0), planted_expiry);
    let mut nodes = tokio::task::block_in_place(|| {
        vec![start_node(&fake, "node0", &direct, Some(&planted))]
    });
    // Node 0 shares its login; the others start without one and adopt it from etcd.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cluster_status(&nodes[0]).await.is_some_and(|c| c.revision > 0) {
        assert!(Instant::now() < deadline, "node0 never shared its login: {}", nodes[0].logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::task::block_in_place(|| {
        nodes.push(start_node(&fake, "node1", &direct, None));
        nodes.push(start_node(&fake, "node2", &proxied, None));
    });

    let stop = Arc::new(AtomicBool::new(false));
    let served: Vec<Arc<Mutex<Served>>> = (0..3).map(|_| Arc::default()).collect();
    for (d, out) in nodes.iter().zip(&served) {
        agent(d.socket.clone(), stop.clone(), out.clone());
    }
    let started = Instant::now();
    let takeover = Duration::from_secs(LEASE_SECS) + TAKEOVER_MARGIN;
    tokio::time::sleep(Duration::from_secs(4)).await;

    let mut round = 0;
    loop {
        round += 1;
        // 1. kill -9 of the owner, which is started again later.
        let owner = wait_owner(&nodes, None, takeover).await;
        let t0 = Instant::now();
        tokio::task::block_in_place(|| nodes[owner].kill());
        let next = wait_owner(&nodes, Some(owner), takeover).await;
        eprintln!("round {round}: node{owner} killed; node{next} owns the login after {:?}", t0.elapsed());
        tokio::time::sleep(Duration::from_secs(3)).await;
        tokio::task::block_in_place(|| nodes[owner].start_again());
        // Its agent reconnects by itself.
        tokio::time::sleep(Duration::from_secs(3)).await;

        // 2. SIGSTOP of the owner past its lease, then SIGCONT: the fence must hold.
        let owner = wait_owner(&nodes, None, takeover).await;
        let t0 = Instant::now();
        nodes[owner].signal(libc::SIGSTOP);
        let next = wait_owner(&nodes, Some(owner), takeover).await;
        eprintln!("round {round}: node{owner} paused; node{next} owns the login after {:?}", t0.elapsed());
        // Let the new owner rotate the login under the paused one.
        let generation = fake.generation();
        let deadline = Instant::now() + Duration::from_secs(10);
        while fake.generation() == generation {
            assert!(
                Instant::now() < deadline,
                "the new owner never refreshed: {}",
                all_logs(&nodes)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        nodes[owner].signal(libc::SIGCONT);
        tokio::time::sleep(Duration::from_secs(4)).await;

        // 3. One etcd member dies (quorum stays), and comes back.
        tokio::task::block_in_place(|| etcd.kill(round % 3));
        tokio::time::sleep(Duration::from_secs(5)).await;
        tokio::task::block_in_place(|| etcd.restart(round % 3));
        tokio::time::sleep(Duration::from_secs(2)).await;

        // 4. Node 2 is cut off from etcd: it reports why, and never refreshes on its own.
        let rotations_before = fake.state().rotations;
        for p in proxies.iter_mut() {
            p.cut();
        }
        let deadline = Instant::now() + takeover;
        loop {
            let c = cluster_status(&nodes[2]).await;
            if let Some(c) = c.filter(|c| c.role == "disconnected") {
                assert!(c.error.is_some(), "a disconnected instance says why");
                break;
            }
            assert!(Instant::now() < deadline, "node2 never noticed it was cut off");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let owner = wait_owner(&nodes, Some(2), takeover).await;
        eprintln!("round {round}: node2 cut off; node{owner} owns the login");
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(fake.state().rotations > rotations_before, "the others kept the login fresh");
        for p in proxies.iter_mut() {
            p.restore().await;
        }
        // Node 2 adopts the current login again.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let current = access_of(fake.generation());
            let fresh = served[2]
                .lock()
                .unwrap()
                .ok
                .last()
                .is_some_and(|(t, _)| *t == current || fake.state().expiry_of.get(t).is_some_and(|e| *e > now()));
            let connected = cluster_status(&nodes[2]).await.is_some_and(|c| c.role != "disconnected");
            if fresh && connected {
                break;
            }
            assert!(Instant::now() < deadline, "node2 did not catch up after the partition: {}", nodes[2].logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if started.elapsed() >= total {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The authority's view: zero invalid_grant, no refresh token presented twice.
    let state = fake.state();
    assert_eq!(
        state.invalid_grants,
        0,
        "an instance spent a stale refresh token: {}",
        all_logs(&nodes)
    );
    let presented = presented_refresh_tokens(&state);
    let unique: HashSet<&String> = presented.iter().collect();
    assert_eq!(unique.len(), presented.len(), "a refresh token was presented twice: {presented:?}");
    assert!(state.rotations >= 10, "the login rotated only {} times", state.rotations);
    // Every token an agent was served was valid when served.
    for (i, s) in served.iter().enumerate() {
        let s = s.lock().unwrap();
        assert!(!s.ok.is_empty(), "agent {i} was never served a token");
        for (token, at) in &s.ok {
            let expiry = if *token == access_of(0) {
                Some(planted_expiry)
            } else {
                state.expiry_of.get(token).copied()
            };
            let expiry = expiry.unwrap_or_else(|| panic!("agent {i} was served a token the authority never issued"));
            assert!(*at <= expiry, "agent {i} was served an expired token ({at} > {expiry})");
        }
        eprintln!("agent {i}: {} tokens served, {} errors", s.ok.len(), s.errors);
    }
    drop(state);
    // The status of a shared login names the owner and the revision.
    let owner = wait_owner(&nodes, None, takeover).await;
    let c = cluster_status(&nodes[owner]).await.expect("status");
    assert_eq!(c.owner.as_deref(), Some(format!("node{owner}").as_str()));
    assert!(c.revision > 0 && c.lease_remaining_ms.is_some());
    let other = (owner + 1) % 3;
    let c = cluster_status(&nodes[other]).await.expect("status");
    assert_eq!(c.role, "follower");
    assert_eq!(c.owner.as_deref(), Some(format!("node{owner}").as_str()));
    drop(proxies);
    drop(etcd);
}
