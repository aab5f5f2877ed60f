//! `ipcbus` with discovery in etcd, through the built binary: `--etcd` and
//! `IPCBUS_ETCD` for `listen`, `send` and `list`, and the configuration errors (a
//! malformed endpoint, both back ends at once) and runtime errors (etcd down) with
//! their exit status. The tests that need a running etcd start one (Debian's
//! `etcd-server`) on free loopback ports and say they skip when there is none.

mod cli_support;

use cli_support::{ipcbus_cmd, json_lines, run, Tmp};
use ipcbus_tests::etcd::Cluster;

fn ipcbus(rt: &Tmp, args: &[&str], env: &[(&str, &str)]) -> cli_support::Ran {
    let mut c = ipcbus_cmd(rt.path());
    c.args(args).envs(env.iter().copied());
    run(c, b"")
}

#[test]
fn listen_send_and_list_through_etcd() {
    let Some(c) = Cluster::start(1) else {
        eprintln!("skipped: no etcd binary (install Debian's etcd-server)");
        return;
    };
    let rt = Tmp::new("etcd-cli");
    let urls = c.endpoints();
    let (mut listener, addr) =
        cli_support::listen(&rt, &["--etcd", &urls, "orders", "--json"], &[]);
    // The flag and the variable reach the same registrations.
    let r = ipcbus(&rt, &["list", "--json", "--etcd", &urls], &[]);
    assert_eq!(r.code(), 0, "{r:?}");
    let arr: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let arr = arr.as_array().unwrap();
    assert_eq!(arr.len(), 1, "{r:?}");
    assert_eq!(arr[0]["handle"], "orders");
    assert_eq!(arr[0]["addr"], addr.as_str());
    let r = ipcbus(&rt, &["list", "orders"], &[("IPCBUS_ETCD", &urls)]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("orders (1 receiver)"), "{r:?}");
    // The local registry of the same runtime dir knows nothing of it.
    let r = ipcbus(&rt, &["list", "--json"], &[]);
    assert_eq!(r.stdout.trim(), "[]", "{r:?}");

    let r = ipcbus(
        &rt,
        &["send", "orders", "hello", "--json"],
        &[("IPCBUS_ETCD", &urls)],
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let summary = json_lines(&r.stdout)
        .into_iter()
        .find(|v| v["event"] == "summary")
        .expect("a summary line");
    assert_eq!(summary["events"], 1, "{r:?}");
    let got = listener.stdout_line("hello");
    assert!(got.contains("hello"), "{got}");
    listener.signal(libc::SIGTERM);
    assert!(listener.wait(cli_support::T).is_some());
    // A receiver that exits deregisters at once.
    let r = ipcbus(&rt, &["list", "--json", "--etcd", &urls], &[]);
    assert_eq!(r.stdout.trim(), "[]", "{r:?}");
}

#[test]
fn etcd_settings_are_checked_and_errors_have_their_exit_status() {
    let rt = Tmp::new("etcd-cfg");
    for (urls, part) in [
        ("127.0.0.1:2379", "must start with http://"),
        ("http://h:99999", "\"99999\" is not a port"),
        ("http://a:1,", "empty"),
    ] {
        let r = ipcbus(&rt, &["--etcd", urls, "list"], &[]);
        assert_eq!(r.code(), 2, "{urls}: {r:?}");
        assert!(
            r.stderr.contains(part) && r.stderr.contains("--etcd"),
            "{urls}: {r:?}"
        );
        let r = ipcbus(&rt, &["list"], &[("IPCBUS_ETCD", urls)]);
        assert_eq!(r.code(), 2, "IPCBUS_ETCD={urls}: {r:?}");
        assert!(r.stderr.contains("IPCBUS_ETCD"), "{urls}: {r:?}");
    }
    let r = ipcbus(&rt, &["--etcd", " ", "list"], &[]);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("--etcd is empty"), "{r:?}");
    // Two back ends at once is a configuration error, not a guess...
    let r = ipcbus(&rt, &["--epm", "h", "--etcd", "http://h", "list"], &[]);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("--epm and --etcd"), "{r:?}");
    let both = [("IPCBUS_EPM", "h"), ("IPCBUS_ETCD", "http://h")];
    let r = ipcbus(&rt, &["list"], &both);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("IPCBUS_EPM and IPCBUS_ETCD"), "{r:?}");
    // ...but a flag chooses over the other's variable.
    let r = ipcbus(
        &rt,
        &["--etcd", "http://h:x", "list"],
        &[("IPCBUS_EPM", "h")],
    );
    assert!(r.stderr.contains("\"x\" is not a port"), "{r:?}");
    // A well-formed endpoint where nothing listens is a runtime failure: exit 1.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    for args in [&["list"][..], &["send", "h", "x"], &["listen", "h"]] {
        let mut all = vec!["--etcd", url.as_str()];
        all.extend_from_slice(args);
        let r = ipcbus(&rt, &all, &[]);
        assert_eq!(r.code(), 1, "{args:?}: {r:?}");
        assert!(
            r.stderr.contains("unavailable") && r.stderr.contains(&url),
            "{args:?}: {r:?}"
        );
    }
    // Every --help names the variable and the option.
    for cmd in [&["--help"][..], &["list", "--help"], &["send", "--help"]] {
        let r = ipcbus(&rt, cmd, &[]);
        assert!(
            r.stdout.contains("IPCBUS_ETCD") && r.stdout.contains("--etcd"),
            "{cmd:?}: {r:?}"
        );
    }
}

#[test]
fn https_endpoints_take_the_ca_of_ipcbus_etcd_ca() {
    let rt = Tmp::new("etcd-cli-tls");
    let Some(tls) = ipcbus_tests::etcd::Tls::make(rt.path()) else {
        eprintln!("skipped: openssl could not make a test certificate");
        return;
    };
    let Some(c) = Cluster::start_tls(1, &tls) else {
        eprintln!("skipped: no etcd binary (install Debian's etcd-server)");
        return;
    };
    let urls = c.endpoints();
    let ca = tls.ca.to_str().unwrap();
    let (_listener, addr) = cli_support::listen(
        &rt,
        &["orders"],
        &[("IPCBUS_ETCD", &urls), ("IPCBUS_ETCD_CA", ca)],
    );
    let r = ipcbus(
        &rt,
        &["--etcd", &urls, "list", "--json"],
        &[("IPCBUS_ETCD_CA", ca)],
    );
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains(&addr), "{r:?}");
    let r = ipcbus(
        &rt,
        &["--etcd", &urls, "list"],
        &[("IPCBUS_ETCD_CA", "/nonexistent/ca.pem")],
    );
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("IPCBUS_ETCD_CA"), "{r:?}");
}
