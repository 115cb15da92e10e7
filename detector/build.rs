//! Builds the kernel programs (detector-ebpf) for bpfel-unknown-none with the
//! Debian toolchain (`rustup toolchain link debian-web /usr`, done by
//! `cargo xtask setup`) and embeds the object in the daemon.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../detector-ebpf");
    println!("cargo:rerun-if-changed=../detector-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "detector-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("debian-web"),
    )
}
