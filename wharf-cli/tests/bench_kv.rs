//! `wharf bench --kv` end to end, one round: every cell of wharf kv (one
//! loop and two) and redis-server is measured, and the table, kv.json and
//! kv.svg are written. (The figures themselves are for the note, not for
//! asserts: the machines are shared.)

use std::process::Command;

#[test]
fn the_kv_bench_measures_every_cell_against_redis_server() {
    if !cfg!(target_os = "linux") {
        eprintln!("SKIPPED: wharf bench --kv runs wharf kv on io_uring (Linux)");
        return;
    }
    let out = std::env::temp_dir().join(format!("wharf-bench-kv-{}", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["bench", "--kv", "--rounds", "1", "--out"])
        .arg(&out)
        .output()
        .expect("run wharf bench --kv");
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("kv.json")).unwrap()).unwrap();
    let cells = json["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 3 * 2 * 3, "3 tests × 2 pipelines × 3 servers");
    for c in cells {
        assert!(c["rps"].as_f64().unwrap() > 1000.0, "{c}");
        assert!(c["rps_ratio"].as_f64().unwrap() > 0.0, "{c}");
    }
    for server in ["wharf-kv", "wharf-kv-2", "redis-server"] {
        assert!(
            table.contains(server),
            "{server} is missing from the table:\n{table}"
        );
    }
    let svg = std::fs::read_to_string(out.join("kv.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<rect").count() >= 18);
    let _ = std::fs::remove_dir_all(&out);
}
