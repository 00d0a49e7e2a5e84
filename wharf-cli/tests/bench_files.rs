//! `wharf bench --files` end to end, one short round with a small file:
//! every sender is measured next to iperf3 and files.json is written. (The
//! figures are for the note, not for asserts: the machines are shared.)

use std::process::Command;

#[test]
fn the_files_bench_measures_every_sender_against_iperf3() {
    if !cfg!(target_os = "linux") {
        eprintln!("SKIPPED: wharf bench --files runs wharf on io_uring (Linux)");
        return;
    }
    let out = std::env::temp_dir().join(format!("wharf-bench-files-{}", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args([
            "bench",
            "--files",
            "--rounds",
            "1",
            "--file-mib",
            "32",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("run wharf bench --files");
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("files.json")).unwrap()).unwrap();
    let cells = json["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 6, "five senders and iperf3");
    for c in cells {
        assert!(c["mb_per_sec"].as_f64().unwrap() > 1.0, "{c}");
        if c["server"] != "iperf3" {
            // Read in clock ticks (10 ms): a small file's may round to 0.
            assert!(c["cpu_per_gib"].as_f64().unwrap() >= 0.0, "{c}");
        }
    }
    for server in [
        "wharf-uring",
        "wharf-poll",
        "wharf-uring-sendfile",
        "wharf-poll-sendfile",
        "tokio-copy",
        "iperf3",
    ] {
        assert!(
            table.lines().any(|l| l.trim_start().starts_with(server)),
            "{server} is missing from the table:\n{table}"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}
