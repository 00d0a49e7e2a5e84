//! `wharf bench --tls` end to end, one short round: every cell of wharf's
//! TLS echo and of tokio-rustls is measured and tls.json is written. (The
//! figures are for the note, not for asserts: the machines are shared.)

use std::process::Command;

#[test]
fn the_tls_bench_measures_every_cell_against_tokio_rustls() {
    if !cfg!(target_os = "linux") {
        eprintln!("SKIPPED: wharf bench --tls runs wharf on io_uring (Linux)");
        return;
    }
    let out = std::env::temp_dir().join(format!("wharf-bench-tls-{}", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args([
            "bench",
            "--tls",
            "--rounds",
            "1",
            "--duration",
            "0.5",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("run wharf bench --tls");
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tls.json")).unwrap()).unwrap();
    let cells = json["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 3 * 2, "3 cells × 2 servers");
    for c in cells {
        assert!(c["per_sec"].as_f64().unwrap() > 10.0, "{c}");
        assert!(c["cpu_us"].as_f64().unwrap() > 0.0, "{c}");
    }
    for row in ["echo 64 B × 100", "echo 16 KiB × 100", "handshakes"] {
        for server in ["wharf-tls", "tokio-rustls"] {
            assert!(
                table.lines().any(|l| l.contains(row) && l.contains(server)),
                "{row} of {server} is missing from the table:\n{table}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}
