//! Records the commit fencegate is built from, for `fencegate_build_info{commit}`; outside a git
//! checkout (a source tarball) it stays `unknown`.

fn main() {
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs");
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok());
    if let Some(commit) = commit {
        println!("cargo:rustc-env=FENCEGATE_COMMIT={}", commit.trim());
    }
}
