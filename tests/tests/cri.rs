//! A containerd + CRI pod (../shared/RUNTIME.md): the test acts as kubelet
//! (RunPodSandbox with the `io.kubernetes.pod.*` labels, CreateContainer,
//! StartContainer over `runtime.v1`), and the attributor, with a CRI handle
//! on that containerd's socket, names the container's cgroup: pod name,
//! namespace, labels, container name and image.

use std::time::Duration;

use detector::attribution::{cri::CriHandle, Attributor};
use detector_tests::{
    cgroup2_root,
    containerd::{Containerd, BUSYBOX_IMAGE},
    require_root,
    runc::new_pod_uid,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pod_is_named_from_cri() {
    require_root();
    let mut cd = Containerd::start().expect("containerd");
    let uid = new_pod_uid();
    let sandbox = cd.sandbox_config(
        "web-7d4b9",
        "shop",
        &uid,
        &[("app", "web"), ("tier", "frontend")],
    );
    let ctr = Containerd::container_config(&sandbox, "app", &["/bin/sleep", "300"], vec![]);
    let sb = sandbox.clone();
    let (sandbox_id, container_id) = cd
        .block_on(move |mut c| async move {
            let sid = c.run_pod_sandbox(sb.clone()).await?;
            let cid = c.create_container(&sid, ctr, sb).await?;
            c.start_container(&cid).await?;
            Ok((sid, cid))
        })
        .unwrap_or_else(|e| panic!("CRI pod: {e:#}\n{}", cd.log()));
    eprintln!("sandbox {sandbox_id}, container {container_id}");

    // The container is where the cgroupfs driver puts it.
    let rel = format!("kubepods/besteffort/pod{uid}/{container_id}");
    let dir = cgroup2_root().join(&rel);
    let id = std::fs::metadata(&dir)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or_else(|e| panic!("container cgroup {}: {e}", dir.display()));

    let mut attr =
        Attributor::new(cgroup2_root()).with_cri(CriHandle::spawn(Some(cd.socket.clone())));
    attr.min_rescan = Duration::ZERO;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let w = loop {
        let w = attr.resolve(id).expect("container cgroup resolves");
        if w.pod_name.is_some() && w.container_name.is_some() {
            break w;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no CRI names within 15 s: {w:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("{w:#?}");
    let pod = w.pod.clone().expect("a pod cgroup");
    assert_eq!(pod.pod_uid, uid);
    assert_eq!(pod.container_id.as_deref(), Some(container_id.as_str()));
    assert_eq!(w.cgroup_path, format!("/{rel}"));
    assert_eq!(w.pod_name.as_deref(), Some("web-7d4b9"));
    assert_eq!(w.namespace.as_deref(), Some("shop"));
    assert_eq!(w.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(w.labels.get("tier").map(String::as_str), Some("frontend"));
    assert_eq!(w.container_name.as_deref(), Some("app"));
    assert_eq!(w.image.as_deref(), Some(BUSYBOX_IMAGE));
    let fw = w.to_workload();
    assert_eq!(fw.pod.as_deref(), Some("web-7d4b9"));
    assert_eq!(fw.namespace.as_deref(), Some("shop"));

    // Kubelet's teardown; the harness's Drop does it too on failure.
    cd.remove_all_pods().expect("stop and remove the pod");
    assert!(!dir.exists(), "container cgroup left behind");
}
