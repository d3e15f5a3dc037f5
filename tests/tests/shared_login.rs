//! The reason llmd exists: many agents and a Claude Code session share one rotating login
//! through many refreshes without anyone being logged out.

use llmd_tests::fake_oauth::{access_of, post_json, refresh_of, FakeOAuth};
use llmd_tests::Daemon;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn creds(access: &str, refresh: &str, expires_at_ms: i64) -> String {
    json!({"claudeAiOauth": {"accessToken": access, "refreshToken": refresh, "expiresAt": expires_at_ms,
        "scopes": ["user:inference", "user:profile"], "subscriptionType": "pro"}})
    .to_string()
}

/// A stand-in for Claude Code's refresh path, following the protocol observed on the real
/// CLI: take `<cfg>/.oauth_refresh.lock` then `<cfg>.lock` (mkdir; if the second is busy,
/// drop the first and retry), re-read the file, refresh only if nobody else did, write by
/// temp file + rename, release.
struct FakeClaudeCode {
    dir: PathBuf,
    fake: FakeOAuth,
    refreshes: AtomicU64,
    skipped: AtomicU64,
    invalid_grants: AtomicU64,
}

impl FakeClaudeCode {
    fn locks(&self) -> [PathBuf; 2] {
        let mut legacy = self.dir.clone().into_os_string();
        legacy.push(".lock");
        [self.dir.join(".oauth_refresh.lock"), PathBuf::from(legacy)]
    }

    fn read(&self) -> (String, String) {
        let v: Value =
            serde_json::from_slice(&std::fs::read(self.dir.join(".credentials.json")).unwrap())
                .unwrap();
        let o = &v["claudeAiOauth"];
        (
            o["accessToken"].as_str().unwrap().to_owned(),
            o["refreshToken"].as_str().unwrap().to_owned(),
        )
    }

    async fn lock(&self) {
        let [a, b] = self.locks();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                Instant::now() < deadline,
                "Claude Code's locks were held for 30 s"
            );
            if std::fs::create_dir(&a).is_ok() {
                if std::fs::create_dir(&b).is_ok() {
                    return;
                }
                std::fs::remove_dir(&a).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100 + rand_ms(200))).await;
        }
    }

    fn unlock(&self) {
        let [a, b] = self.locks();
        std::fs::remove_dir(b).unwrap();
        std::fs::remove_dir(a).unwrap();
    }

    /// One forced refresh, as Claude Code does on a 401 or near expiry.
    async fn refresh_once(&self) {
        let seen = self.read().0;
        self.lock().await;
        let (access, refresh) = self.read();
        if access != seen {
            // Someone refreshed while we waited: use theirs (Claude Code does the same).
            self.skipped.fetch_add(1, Ordering::Relaxed);
            self.unlock();
            return;
        }
        let (status, body) = post_json(
            self.fake.addr,
            "/v1/oauth/token",
            &json!({"grant_type": "refresh_token", "refresh_token": refresh, "client_id": "9d1c250a-e61b-44d9-88ed-5944d1962f5e"}),
        )
        .await;
        if status == 200 {
            let path = self.dir.join(".credentials.json");
            let tmp = self.dir.join(format!(
                ".credentials.json.tmp.{:08x}",
                rand_ms(u32::MAX as u64)
            ));
            let exp = now() * 1000 + body["expires_in"].as_i64().unwrap() * 1000;
            std::fs::write(
                &tmp,
                creds(
                    body["access_token"].as_str().unwrap(),
                    body["refresh_token"].as_str().unwrap(),
                    exp,
                ),
            )
            .unwrap();
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
            self.refreshes.fetch_add(1, Ordering::Relaxed);
        } else if body.to_string().contains("invalid_grant") {
            self.invalid_grants.fetch_add(1, Ordering::Relaxed);
        }
        self.unlock();
    }
}

fn rand_ms(max: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (n.wrapping_mul(6364136223846793005) >> 17) % max.max(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_agents_and_claude_code_share_one_login_without_invalid_grant() {
    let fake = FakeOAuth::start(3).await;
    let cfg = format!(
        "[profiles.claude]\nprovider = \"anthropic\"\nauth = \"claude-cli\"\ntoken_endpoint = \"{}\"\n",
        fake.anthropic_url()
    );
    let d = Daemon::builder()
        .config(&cfg)
        .file(
            ".claude/.credentials.json",
            &creds(&access_of(0), &refresh_of(0), (now() + 3) * 1000),
            0o600,
        )
        .start();
    let cc = Arc::new(FakeClaudeCode {
        dir: d.home.join(".claude"),
        fake: fake.clone(),
        refreshes: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        invalid_grants: AtomicU64::new(0),
    });
    let deadline = Instant::now() + Duration::from_secs(14);
    let served = Arc::new(AtomicU64::new(0));
    let mut agents = Vec::new();
    for _ in 0..8 {
        let c = d.client().await;
        let served = served.clone();
        agents.push(tokio::spawn(async move {
            let mut distinct = std::collections::HashSet::new();
            while Instant::now() < deadline {
                // A daemon that stops answering fails the test instead of hanging it.
                let t = tokio::time::timeout(Duration::from_secs(10), c.token("claude", Some(1)))
                    .await
                    .expect("the daemon stopped answering")
                    .expect("an agent never sees an error");
                assert!(t.expires_at.unwrap() >= now(), "served an expired token");
                distinct.insert(t.token);
                served.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            distinct.len()
        }));
    }
    let claude = {
        let cc = cc.clone();
        tokio::spawn(async move {
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(700 + rand_ms(800))).await;
                cc.refresh_once().await;
            }
        })
    };
    let mut seen_by_agents = 0;
    for a in agents {
        seen_by_agents = seen_by_agents.max(a.await.unwrap());
    }
    claude.await.unwrap();
    let rotations = fake.state().rotations;
    eprintln!(
        "rotations {rotations}, by claude-code stand-in {}, its skips {}, tokens served {}, distinct tokens seen by one agent {seen_by_agents}",
        cc.refreshes.load(Ordering::Relaxed),
        cc.skipped.load(Ordering::Relaxed),
        served.load(Ordering::Relaxed)
    );
    assert_eq!(fake.invalid_grants(), 0, "nobody was logged out");
    assert_eq!(cc.invalid_grants.load(Ordering::Relaxed), 0);
    assert!(rotations >= 8, "many rotations happened: {rotations}");
    assert!(
        cc.refreshes.load(Ordering::Relaxed) >= 1,
        "the Claude Code stand-in refreshed too"
    );
    assert!(seen_by_agents >= 4, "agents followed the rotations");
    // The daemon serves what the file holds (both rotate every ~1.5 s, so poll).
    let c = d.client().await;
    let mut agreed = false;
    for _ in 0..50 {
        let file = cc.read().0;
        let served = c.token("claude", None).await.unwrap().token;
        if served == file && cc.read().0 == file {
            agreed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(agreed, "daemon and Claude Code's file hold the same login");
    let mut d = d;
    assert!(d.stop().unwrap().success());
    assert!(
        !Path::new(&d.home.join(".claude/.oauth_refresh.lock")).exists(),
        "locks released on exit"
    );
    assert!(
        !Path::new(&d.home.join(".claude.lock")).exists(),
        "locks released on exit"
    );
    let logs = d.logs();
    assert!(
        !logs.contains("fakeaccess") && !logs.contains("fakerefresh"),
        "secrets in logs"
    );
}
