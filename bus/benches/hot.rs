//! criterion benches of the hot functions: frame encode/decode, seal/open
//! (AES-256-GCM), gzip in/out, the handshake, key derivation.
//!
//! ```text
//! cargo bench -p ipcbus --bench hot
//! cargo bench -p ipcbus --bench hot -- gzip      # one group
//! ```
//! Sizes are 64 B, 1 KiB and 64 KiB; throughput is in payload bytes.

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ipcbus::{Discovery, Handle, Receiver, ReceiverId, Sender, SenderId};
use ipcbus_proto::codec::{put_frame, CodecV1};
use ipcbus_proto::compress::{gunzip, gzip, Gunzipper, Gzipper};
use ipcbus_proto::crypto::{proofs_equal, Key, Sealer, SessionKeys};
use ipcbus_proto::frame::{Flags, Hello, HelloParse, Kind, Mode, Welcome, VERSION};

const SIZES: [usize; 3] = [64, 1024, 64 * 1024];

/// Text-like bytes that gzip shrinks by about 3-4x, like JSON or log events.
fn compressible(n: usize) -> Vec<u8> {
    let words = [
        "order",
        "id",
        "price",
        "qty",
        "side",
        "buy",
        "sell",
        "ts",
        "1763700000",
        "EUR",
        "status",
        "filled",
        "\"",
        ":",
        ",",
        "{",
        "}",
    ];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut out = Vec::with_capacity(n + 16);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
        out.push(b' ');
    }
    out.truncate(n);
    out
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for n in SIZES {
        let body = vec![0x5a; n];
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::new("encode", n), &body, |b, body| {
            let mut buf = BytesMut::with_capacity(n + 64);
            b.iter(|| {
                buf.clear();
                put_frame(&mut buf, Kind::Data, Flags(0), black_box(7), body);
                black_box(buf.len());
            })
        });
        let mut wire = BytesMut::new();
        put_frame(&mut wire, Kind::Data, Flags(0), 7, &body);
        let wire = wire.freeze();
        g.bench_with_input(BenchmarkId::new("decode", n), &wire, |b, wire| {
            let mut codec = CodecV1::default();
            b.iter(|| {
                let mut src = BytesMut::from(&wire[..]);
                black_box(codec.decode(&mut src).ok().flatten());
            })
        });
    }
    g.finish();
}

fn sealing(c: &mut Criterion) {
    let mut g = c.benchmark_group("aes256gcm");
    let key = [7u8; 32];
    let sealer = Sealer::new(&key);
    for n in SIZES {
        let body = vec![0x5a; n];
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::new("seal", n), &body, |b, body| {
            let mut buf = BytesMut::with_capacity(n + 64);
            let mut seq = 0u64;
            b.iter(|| {
                buf.clear();
                seq += 1;
                sealer.put_sealed(&mut buf, Kind::Data, Flags(0), seq, body);
                black_box(buf.len());
            })
        });
        let mut wire = BytesMut::new();
        sealer.put_sealed(&mut wire, Kind::Data, Flags(0), 9, &body);
        let flags = Flags(Flags::SEALED);
        g.bench_with_input(BenchmarkId::new("open", n), &wire, |b, wire| {
            let mut work = wire.to_vec();
            b.iter(|| {
                work.copy_from_slice(wire);
                let r = sealer.open_in_place(Kind::Data, flags, 9, &mut work[14..]);
                black_box(r.is_ok());
            })
        });
    }
    g.finish();
}

fn compression(c: &mut Criterion) {
    let mut g = c.benchmark_group("gzip");
    for n in SIZES {
        let data = compressible(n);
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::new("compress_l1", n), &data, |b, d| {
            b.iter(|| black_box(gzip(d, 1)))
        });
        let mut gz = Gzipper::new(1);
        g.bench_with_input(BenchmarkId::new("compress_l1_reused", n), &data, |b, d| {
            b.iter(|| black_box(gz.gzip(d)))
        });
        let z = gzip(&data, 1).unwrap_or_else(|| data.clone());
        let is_gzip = z.len() < data.len();
        if is_gzip {
            g.bench_with_input(BenchmarkId::new("inflate", n), &z, |b, z| {
                b.iter(|| black_box(gunzip(z, 16 << 20).map(|v| v.len())))
            });
            let mut ugz = Gunzipper::default();
            g.bench_with_input(BenchmarkId::new("inflate_reused", n), &z, |b, z| {
                b.iter(|| black_box(ugz.gunzip(z, 16 << 20).map(|v| v.len())))
            });
        }
    }
    g.finish();
}

/// Everything a handshake computes on both sides, without the socket: encode and
/// parse Hello and Welcome, derive the session keys on each side, check the proofs.
fn handshake(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake");
    let master = Key::from_bytes([3; 32]);
    let handle = Handle::new("orders").expect("valid handle");
    g.bench_function("compute (both sides)", |b| {
        b.iter(|| {
            let hello = Hello {
                version: VERSION,
                mode: Mode::Authenticated,
                handle: handle.clone(),
                sender: SenderId([1; 16]),
                nonce: [2; 32],
            };
            let mut hb = BytesMut::new();
            hello.encode(&mut hb);
            let Ok(HelloParse::Hello(h)) = Hello::parse(&hb) else {
                panic!("hello parses")
            };
            let rid = ReceiverId([4; 16]);
            let ks = SessionKeys::derive(&master, &hb, &h.nonce, &rid, &[5; 32]);
            let w = Welcome {
                receiver: rid,
                nonce: [5; 32],
                proof: Some(ks.proof_s),
            };
            let mut wb = BytesMut::new();
            w.encode(&mut wb);
            let w = Welcome::parse(&wb).expect("welcome parses");
            let kc = SessionKeys::derive(&master, &hb, &hello.nonce, &w.receiver, &w.nonce);
            let ok = w.proof.is_some_and(|p| proofs_equal(&p, &kc.proof_s))
                && proofs_equal(&kc.proof_c, &ks.proof_c);
            black_box((ok, Sealer::new(&kc.c2s), Sealer::new(&ks.c2s)));
        })
    });

    // A real connection on loopback: discovery scan, TCP connect, handshake (local-user
    // mode, so both proofs), first receiver ready.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("ipcbus-bench-hs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rx = rt.block_on(async {
        Receiver::builder(handle.clone())
            .discovery(Discovery::local_at(&dir).expect("registry"))
            .bind()
            .await
            .expect("bind")
    });
    g.measurement_time(Duration::from_secs(8));
    g.bench_function("connect over loopback", |b| {
        b.to_async(&rt).iter(|| async {
            let mut tx = Sender::builder(handle.clone())
                .discovery(Discovery::local_at(&dir).expect("registry"))
                .build()
                .await
                .expect("sender");
            let n = tx.wait_for_receivers(1, Duration::from_secs(5)).await;
            assert_eq!(n, 1);
            drop(tx);
        })
    });
    drop(rx);
    let _ = std::fs::remove_dir_all(&dir);
    g.finish();
}

fn keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("key");
    g.sample_size(10);
    let mut i = 0u64;
    // A fresh salt each time: Key::derive caches per (password, salt).
    g.bench_function("derive argon2id (uncached)", |b| {
        b.iter(|| {
            i += 1;
            black_box(Key::derive("correct horse battery staple", i.to_be_bytes()))
        })
    });
    g.bench_function("derive (cached)", |b| {
        b.iter(|| black_box(Key::derive("correct horse battery staple", [1u8, 2, 3])))
    });
    g.bench_function("from_secret hkdf", |b| {
        b.iter(|| black_box(Key::from_secret(&[9u8; 32])))
    });
    g.finish();
}

criterion_group!(benches, frames, sealing, compression, handshake, keys);
criterion_main!(benches);
