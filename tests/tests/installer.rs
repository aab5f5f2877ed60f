//! `installer/install.sh` and `uninstall.sh` into a temporary `--root`: every file and
//! permission, the unit checked by `systemd-analyze verify` when it is available, the
//! installed binary run with the installed config and reached with `ipcbus epm status`,
//! idempotent re-runs, `--dry-run`, and nothing left after uninstalling.

mod cli_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cli_support::{epm_service, ipcbus_cmd, repo, run, Epm, Ran, Tmp};
use serde_json::Value;

const SALT: &str = "{0x01,0x02,0x03}";

fn script(name: &str) -> PathBuf {
    repo().join("installer").join(name)
}

fn sh(name: &str, args: &[&str]) -> Ran {
    let mut c = Command::new("bash");
    c.arg(script(name)).args(args);
    run(c, b"")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Every regular file and symlink below `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(_) => out.push(p),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

/// `install.sh --root ROOT --binary EPM EXTRA...`: everything else left to the
/// installer (a re-run keeps the settings, a first run generates a password).
fn install_with_defaults(root: &Path, extra: &[&str]) -> Ran {
    let bin = epm_service();
    let mut args = vec![
        "--root",
        root.to_str().expect("utf-8"),
        "--binary",
        bin.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    sh("install.sh", &args)
}

fn install(root: &Path, pw: &Path, extra: &[&str]) -> Ran {
    let bin = epm_service();
    let mut args = vec![
        "--root",
        root.to_str().expect("utf-8 path"),
        "--binary",
        bin.to_str().expect("utf-8 path"),
        "--password-file",
        pw.to_str().expect("utf-8 path"),
        "--salt",
        SALT,
        "--port",
        "0",
        "--bind",
        "127.0.0.1",
    ];
    args.extend_from_slice(extra);
    sh("install.sh", &args)
}

#[test]
fn install_verify_run_and_uninstall() {
    let tmp = Tmp::new("install");
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).expect("mkdir root");
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "installed secret\n").expect("write password");

    let r = install(&root, &pw, &[]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("Firewall hint"), "{}", r.stdout);

    let bin = root.join("usr/local/bin/epm-service");
    let conf_dir = root.join("etc/ipcbus");
    let conf = conf_dir.join("epm.toml");
    let pwfile = conf_dir.join("epm.password");
    let unit = root.join("etc/systemd/system/ipcbus-epm.service");
    assert_eq!(
        files(&root),
        {
            let mut v = vec![bin.clone(), conf.clone(), pwfile.clone(), unit.clone()];
            v.sort();
            v
        },
        "exactly these files are installed"
    );
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(mode(&conf_dir), 0o750);
    assert_eq!(mode(&conf), 0o640);
    assert_eq!(mode(&pwfile), 0o600);
    assert_eq!(mode(&unit), 0o644);
    assert_eq!(
        std::fs::read_to_string(&pwfile).expect("read password"),
        "installed secret\n"
    );

    let toml = std::fs::read_to_string(&conf).expect("read config");
    for line in [
        "port = 0",
        "bind = [\"127.0.0.1\"]",
        "password_file = \"/etc/ipcbus/epm.password\"",
        "salt = \"{0x01,0x02,0x03}\"",
        "lease_ms = 10000",
    ] {
        assert!(
            toml.lines().any(|l| l == line),
            "{line:?} missing in\n{toml}"
        );
    }

    let unit_text = std::fs::read_to_string(&unit).expect("read unit");
    for d in [
        "ExecStart=/usr/local/bin/epm-service --config /etc/ipcbus/epm.toml",
        "User=ipcbus",
        "After=network-online.target",
        "Wants=network-online.target",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "KillSignal=SIGTERM",
        "WantedBy=multi-user.target",
    ] {
        assert!(
            unit_text.lines().any(|l| l == d),
            "{d:?} missing in\n{unit_text}"
        );
    }
    for placeholder in ["@BINDIR@", "@CONFDIR@", "@USER@", "@CAPS@"] {
        assert!(
            !unit_text.contains(placeholder),
            "{placeholder} left in\n{unit_text}"
        );
    }

    verify_unit(&unit_text, &root, tmp.path());

    // Idempotent: a second run changes nothing.
    let before: Vec<(PathBuf, Vec<u8>)> = files(&root)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).expect("read installed file");
            (p, b)
        })
        .collect();
    let r = install(&root, &pw, &[]);
    assert_eq!(r.code(), 0, "{r:?}");
    for (p, b) in &before {
        assert_eq!(
            &std::fs::read(p).expect("read again"),
            b,
            "{} changed",
            p.display()
        );
    }
    // A re-run without settings keeps the port, bind, password and salt.
    let r = install_with_defaults(&root, &[]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(std::fs::read_to_string(&conf).expect("read config"), toml);
    assert_eq!(
        std::fs::read_to_string(&pwfile).expect("read password"),
        "installed secret\n"
    );

    // The installed binary with the installed config. The config names the password
    // file at its deployed path, /etc/ipcbus/epm.password; below --root it is
    // elsewhere, and a flag overrides the file's setting.
    let epm = Epm::start(
        &bin,
        &[
            "--config",
            conf.to_str().expect("utf-8"),
            "--password-file",
            pwfile.to_str().expect("utf-8"),
        ],
    );
    assert!(epm.addr.starts_with("127.0.0.1:"), "{}", epm.addr);
    let mut c = ipcbus_cmd(tmp.path());
    c.args([
        "--epm",
        &epm.addr,
        "--password-file",
        pwfile.to_str().expect("utf-8"),
        "--salt",
        SALT,
        "epm",
        "status",
        "--json",
    ]);
    let r = run(c, b"");
    assert_eq!(r.code(), 0, "{r:?}");
    let st: Value = serde_json::from_str(r.stdout.trim()).expect("status JSON");
    assert_eq!(st["lease_ms"], 10000, "{st}");
    assert!(st["version"].is_string(), "{st}");
    drop(epm);

    let r = sh("uninstall.sh", &["--root", root.to_str().expect("utf-8")]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(
        files(&root),
        Vec::<PathBuf>::new(),
        "files left after uninstall"
    );
    assert!(!conf_dir.exists(), "{} left", conf_dir.display());
}

/// `systemd-analyze verify` on the unit, when the tool exists. The unit names the
/// binary at its deployed path; below `--root` it is elsewhere, so the check runs on a
/// copy whose ExecStart points at the staged binary, everything else unchanged.
fn verify_unit(unit_text: &str, root: &Path, tmp: &Path) {
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        println!("SKIP systemd-analyze verify: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    let staged = root.join("usr/local/bin/");
    let text = unit_text.replace(
        "ExecStart=/usr/local/bin/",
        &format!("ExecStart={}", staged.display()),
    );
    let dir = tmp.join("verify");
    std::fs::create_dir_all(&dir).expect("mkdir verify");
    let copy = dir.join("ipcbus-epm.service");
    std::fs::write(&copy, text).expect("write unit copy");
    let mut c = Command::new("systemd-analyze");
    c.args(["verify", "--man=no", "--generators=no"]).arg(&copy);
    let r = run(c, b"");
    assert_eq!(r.code(), 0, "systemd-analyze verify: {r:?}");
    assert!(
        !r.stderr.contains("ipcbus-epm.service:"),
        "systemd-analyze verify complained: {}",
        r.stderr
    );
}

#[test]
fn dry_run_changes_nothing_and_keep_config_keeps_it() {
    let tmp = Tmp::new("dry");
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).expect("mkdir root");
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "pw\n").expect("write password");

    let r = install(&root, &pw, &["--dry-run"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("would write"), "{r:?}");
    assert!(
        r.stdout.contains("port = 0"),
        "dry run shows the config: {r:?}"
    );
    assert!(
        !r.stdout.contains("pw\n"),
        "dry run must not print the password"
    );
    assert_eq!(files(&root), Vec::<PathBuf>::new(), "dry run wrote files");

    let r = install(&root, &pw, &[]);
    assert_eq!(r.code(), 0, "{r:?}");
    let r = sh(
        "uninstall.sh",
        &["--root", root.to_str().expect("utf-8"), "--dry-run"],
    );
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(files(&root).len(), 4, "dry-run uninstall removed files");

    let r = sh(
        "uninstall.sh",
        &["--root", root.to_str().expect("utf-8"), "--keep-config"],
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let left = files(&root);
    let want = vec![
        root.join("etc/ipcbus/epm.password"),
        root.join("etc/ipcbus/epm.toml"),
    ];
    assert_eq!(left, want);
}

#[test]
fn generated_password_and_salt_when_none_given() {
    let tmp = Tmp::new("gen");
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).expect("mkdir root");
    let bin = epm_service();
    let r = install_with_defaults(&root, &[]);
    assert_eq!(r.code(), 0, "{r:?}");
    let pw = std::fs::read_to_string(root.join("etc/ipcbus/epm.password")).expect("password");
    assert!(pw.trim().len() >= 24, "generated password {pw:?}");
    let toml = std::fs::read_to_string(root.join("etc/ipcbus/epm.toml")).expect("config");
    assert!(toml.contains("port = 4455"), "{toml}");
    let salt = toml
        .lines()
        .find_map(|l| l.strip_prefix("salt = \""))
        .and_then(|s| s.strip_suffix('"'))
        .expect("a salt line");
    assert_eq!(salt.len(), 32, "{salt}");
    assert!(salt.bytes().all(|b| b.is_ascii_hexdigit()), "{salt}");
    // The service accepts what the installer wrote.
    let epm = Epm::start(
        &bin,
        &[
            "--config",
            root.join("etc/ipcbus/epm.toml").to_str().expect("utf-8"),
            "--password-file",
            root.join("etc/ipcbus/epm.password")
                .to_str()
                .expect("utf-8"),
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
        ],
    );
    assert!(epm.addr.starts_with("127.0.0.1:"));
}

#[test]
fn bad_options_exit_2() {
    let tmp = Tmp::new("bad");
    let root = tmp.path().to_str().expect("utf-8").to_string();
    for args in [
        vec!["--salt", "zz"],
        vec!["--salt", "{0x01,"],
        vec!["--port", "70000"],
        vec!["--port", "x"],
        vec!["--bind", "not an address"],
        vec!["--password-file", "/nonexistent/pw"],
        vec!["--no-password", "--salt", "0102"],
        vec!["--prefix", "relative"],
        vec!["--frobnicate"],
    ] {
        let mut all = vec![
            "--root",
            root.as_str(),
            "--binary",
            "/bin/true",
            "--dry-run",
        ];
        all.extend_from_slice(&args);
        let r = sh("install.sh", &all);
        assert_eq!(r.code(), 2, "{args:?}: {r:?}");
        assert!(r.stderr.contains("error"), "{args:?}: {r:?}");
    }
    let r = sh("uninstall.sh", &["--frobnicate"]);
    assert_eq!(r.code(), 2, "{r:?}");
}

/// `--help` of both scripts is their header comment and nothing after it (it used to
/// end with the script's first command, `set -euo pipefail`).
#[test]
fn help_is_the_header_comment_only() {
    for name in ["install.sh", "uninstall.sh"] {
        let r = sh(name, &["--help"]);
        assert_eq!(r.code(), 0, "{name}: {r:?}");
        assert!(!r.stdout.contains("set -"), "{name} --help:\n{}", r.stdout);
        assert_eq!(
            r.stdout.trim_end().lines().last(),
            Some("--dry-run prints what would be done and changes nothing."),
            "{name} --help:\n{}",
            r.stdout
        );
        assert!(!r.stdout.contains("#!"), "{name} --help:\n{}", r.stdout);
    }
}

/// The installed unit's header reads as written: the template's own description,
/// whose placeholder names the substitution used to replace by their values, is left
/// out.
#[test]
fn installed_unit_header_reads_right() {
    let tmp = Tmp::new("unit");
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).expect("mkdir root");
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "pw\n").expect("write password");
    let r = install(&root, &pw, &[]);
    assert_eq!(r.code(), 0, "{r:?}");
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/ipcbus-epm.service"))
        .expect("read unit");
    let header: Vec<&str> = unit.lines().take_while(|l| !l.starts_with('[')).collect();
    assert_eq!(
        header,
        [
            "# ipcbus endpoint manager (EPM): system-wide and LAN discovery for ipcbus.",
            "#",
            "# Written by ipcbus's installer/install.sh; re-run it rather than editing this file.",
            "# Settings live in /etc/ipcbus/epm.toml, so they persist across restarts and reboots.",
            "",
        ],
        "{unit}"
    );
}

/// The names of the sections of an ELF64 little-endian file.
fn elf_sections(bytes: &[u8]) -> Vec<String> {
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().expect("2 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF file");
    assert_eq!((bytes[4], bytes[5]), (2, 1), "not ELF64 little-endian");
    let shoff = u64_at(0x28) as usize;
    let shentsize = u16_at(0x3a) as usize;
    let shnum = u16_at(0x3c) as usize;
    let shstrndx = u16_at(0x3e) as usize;
    let strtab = u64_at(shoff + shstrndx * shentsize + 0x18) as usize;
    (0..shnum)
        .map(|i| {
            let name = strtab + u32_at(shoff + i * shentsize) as usize;
            let end = bytes[name..]
                .iter()
                .position(|&b| b == 0)
                .expect("NUL-terminated name");
            String::from_utf8_lossy(&bytes[name..name + end]).into_owned()
        })
        .collect()
}

/// The installed binary has no symbols and no debug info, even from a `--binary` with
/// both (the test binary is a debug build); the default build uses the `deploy`
/// profile, without debug info.
#[test]
fn installed_binary_is_stripped() {
    let tmp = Tmp::new("strip");
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).expect("mkdir root");
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "pw\n").expect("write password");
    let src = std::fs::read(epm_service()).expect("read the test's epm-service");
    let src_sections = elf_sections(&src);
    assert!(
        src_sections.iter().any(|s| s == ".debug_info"),
        "the test needs a binary with debug info: {src_sections:?}"
    );
    let r = install(&root, &pw, &[]);
    assert_eq!(r.code(), 0, "{r:?}");
    let installed = std::fs::read(root.join("usr/local/bin/epm-service")).expect("read");
    let sections = elf_sections(&installed);
    for s in [".symtab", ".debug_info", ".debug_line"] {
        assert!(!sections.iter().any(|x| x == s), "{s} in {sections:?}");
    }
    assert!(
        installed.len() * 2 < src.len(),
        "{} bytes installed from {}",
        installed.len(),
        src.len()
    );

    let cargo_toml = std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml");
    let deploy = cargo_toml
        .split("[profile.deploy]")
        .nth(1)
        .expect("a [profile.deploy] in Cargo.toml");
    let deploy = deploy.split("\n[").next().unwrap_or(deploy);
    for line in ["inherits = \"release\"", "debug = 0", "strip = true"] {
        assert!(deploy.lines().any(|l| l == line), "{line:?} in {deploy}");
    }
    // Without --binary it builds with that profile.
    let r = sh(
        "install.sh",
        &["--root", root.to_str().expect("utf-8"), "--dry-run"],
    );
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("cargo build --profile deploy"), "{r:?}");
}

/// A dry run does not claim to have generated a password, and the firewall hint's
/// commands all open the port to a LAN subnet only, not to everyone.
#[test]
fn dry_run_and_firewall_hint_say_what_is_true() {
    let tmp = Tmp::new("hint");
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).expect("mkdir root");
    let r = install_with_defaults(&root, &["--dry-run"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(
        !r.stdout.contains("generated a random password"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("would generate a random password"),
        "{}",
        r.stdout
    );
    assert_eq!(files(&root), Vec::<PathBuf>::new(), "dry run wrote files");

    let r = install_with_defaults(&root, &[]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(
        r.stdout.contains("generated a random password"),
        "{}",
        r.stdout
    );
    let hint: Vec<&str> = r
        .stdout
        .lines()
        .skip_while(|l| !l.contains("Firewall hint"))
        .filter(|l| l.contains("ufw ") || l.contains("firewall-cmd ") || l.contains("nft "))
        .collect();
    assert_eq!(hint.len(), 3, "{}", r.stdout);
    for l in hint {
        assert!(
            l.contains("192.168.1.0/24"),
            "opens the port beyond the LAN: {l}"
        );
    }
}
