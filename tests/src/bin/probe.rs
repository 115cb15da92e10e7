//! `probe`: does exactly one thing the tests want the kernel to see, by a
//! chosen route, and reports the outcome on stdout. Started inside a test
//! cgroup by the privileged tests.
//!
//! probe open-abs PATH | open-rel PATH | open-syscall PATH | creat PATH |
//!       openat2 PATH | by-handle PATH | pidfd-getfd PATH | read PATH |
//!       connect IP PORT | udp IP PORT | hold-fork PATH | sleep-then-connect MS IP PORT |
//!       open-loop PATH N | connect-flood PATH|- MIN | read-connect PATH IP PORT |
//!       uring-open PATH [async] | open-connect PATH IP PORT
//! Exit status 0 on success; on a failed syscall it prints `errno=N` and exits 3.

use std::{
    ffi::CString,
    io::{BufRead, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
    time::Duration,
};

fn c(path: &str) -> CString {
    CString::new(path).expect("no NUL in path")
}

fn check(rc: i64) -> i64 {
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        println!("errno={}", e.raw_os_error().unwrap_or(0));
        std::process::exit(3);
    }
    rc
}

fn hold(fd: i64) {
    // Keep the fd open until we exit: one access, one event.
    std::mem::forget(unsafe { OwnedFd::from_raw_fd(fd as i32) });
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| {
        args.get(i)
            .cloned()
            .unwrap_or_else(|| panic!("missing argument {i}"))
    };
    match a(0).as_str() {
        "open-abs" => {
            hold(check(
                unsafe { libc::openat(libc::AT_FDCWD, c(&a(1)).as_ptr(), libc::O_RDONLY) } as i64,
            ))
        }
        "open-rel" => {
            let p = Path::new(&args[1]);
            std::env::set_current_dir(p.parent().unwrap()).unwrap();
            let name = p.file_name().unwrap().to_str().unwrap();
            hold(check(
                unsafe { libc::open(c(name).as_ptr(), libc::O_RDONLY) } as i64,
            ));
        }
        "open-syscall" => {
            hold(check(unsafe {
                libc::syscall(libc::SYS_open, c(&a(1)).as_ptr(), libc::O_RDONLY, 0)
            }));
        }
        "creat" => hold(check(unsafe {
            libc::syscall(libc::SYS_creat, c(&a(1)).as_ptr(), 0o600)
        })),
        "openat2" => {
            let how = OpenHow {
                flags: libc::O_RDONLY as u64,
                mode: 0,
                resolve: 0,
            };
            hold(check(unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    libc::AT_FDCWD,
                    c(&a(1)).as_ptr(),
                    &how as *const OpenHow,
                    std::mem::size_of::<OpenHow>(),
                )
            }));
        }
        "by-handle" => {
            // name_to_handle_at does not open the file; open_by_handle_at does.
            #[repr(C)]
            struct Handle {
                bytes: u32,
                kind: i32,
                f: [u8; 128],
            }
            let mut h = Handle {
                bytes: 128,
                kind: 0,
                f: [0; 128],
            };
            let mut mount_id: i32 = 0;
            check(unsafe {
                libc::syscall(
                    libc::SYS_name_to_handle_at,
                    libc::AT_FDCWD,
                    c(&a(1)).as_ptr(),
                    &mut h as *mut Handle,
                    &mut mount_id as *mut i32,
                    0,
                )
            });
            let dir = Path::new(&args[1])
                .parent()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let mfd =
                check(
                    unsafe { libc::open(c(&dir).as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) }
                        as i64,
                );
            hold(check(unsafe {
                libc::syscall(
                    libc::SYS_open_by_handle_at,
                    mfd,
                    &mut h as *mut Handle,
                    libc::O_RDONLY,
                )
            }));
        }
        "pidfd-getfd" => {
            // A child opens the file; we take a duplicate of its fd.
            let (mut r, mut w) = pipe();
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let fd = check(unsafe { libc::open(c(&a(1)).as_ptr(), libc::O_RDONLY) } as i64);
                w.write_all(format!("{fd}\n").as_bytes()).unwrap();
                std::thread::sleep(Duration::from_secs(5));
                unsafe { libc::_exit(0) };
            }
            let mut line = String::new();
            std::io::BufReader::new(&mut r)
                .read_line(&mut line)
                .unwrap();
            let target: i64 = line.trim().parse().unwrap();
            let pidfd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) });
            hold(check(unsafe {
                libc::syscall(libc::SYS_pidfd_getfd, pidfd, target, 0)
            }));
            println!("child={pid}");
            unsafe { libc::kill(pid, libc::SIGKILL) };
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        }
        "read" => {
            let _ = std::fs::read(a(1)).map_err(|e| {
                println!("errno={}", e.raw_os_error().unwrap_or(0));
                std::process::exit(3)
            });
        }
        "connect" => connect(&a(1), &a(2)),
        "udp" => {
            let ip: IpAddr = a(1).parse().unwrap();
            let port: u16 = a(2).parse().unwrap();
            let bind = if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let s = UdpSocket::bind(bind).unwrap();
            match s.send_to(b"x", SocketAddr::new(ip, port)) {
                Ok(_) => println!("sent"),
                Err(e) => {
                    println!("errno={}", e.raw_os_error().unwrap_or(0));
                    std::process::exit(3);
                }
            }
        }
        "hold-fork" => {
            // Open the credential, fork; print both pids; exit when stdin closes.
            hold(check(
                unsafe { libc::open(c(&a(1)).as_ptr(), libc::O_RDONLY) } as i64,
            ));
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            println!("parent={} child={pid}", std::process::id());
            std::io::stdout().flush().unwrap();
            let mut sink = String::new();
            while std::io::stdin()
                .read_line(&mut sink)
                .map(|n| n > 0)
                .unwrap_or(false)
            {}
            unsafe { libc::kill(pid, libc::SIGKILL) };
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        }
        "uring-open" => {
            // IORING_OP_OPENAT: no open-family syscall at all. `async`
            // forces the io-wq worker thread (IOSQE_ASYNC); otherwise the
            // kernel opens inline in io_uring_enter when it can.
            use io_uring::{opcode, squeue, types, IoUring};
            let path = c(&a(1));
            let mut ring = IoUring::new(4).unwrap_or_else(|e| {
                println!("errno={}", e.raw_os_error().unwrap_or(0));
                std::process::exit(3)
            });
            let mut sqe = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
                .flags(libc::O_RDONLY | libc::O_CLOEXEC)
                .build()
                .user_data(1);
            if args.get(2).map(String::as_str) == Some("async") {
                sqe = sqe.flags(squeue::Flags::ASYNC);
            }
            // SAFETY: `path` outlives the submission (we wait for it).
            unsafe { ring.submission().push(&sqe).expect("submission queue full") };
            ring.submit_and_wait(1).expect("io_uring_enter");
            let res = ring.completion().next().expect("a completion").result();
            if res < 0 {
                println!("errno={}", -res);
                std::process::exit(3);
            }
            hold(res as i64);
        }
        "open-connect" => {
            // Open the credential, then connect at once: nothing in between
            // for an asynchronous sensor to catch up with.
            hold(check(
                unsafe { libc::open(c(&a(1)).as_ptr(), libc::O_RDONLY) } as i64,
            ));
            connect(&a(2), &a(3));
        }
        "sleep-then-connect" => {
            std::thread::sleep(Duration::from_millis(a(1).parse().unwrap()));
            connect(&a(2), &a(3));
        }
        "open-loop" => {
            // N opens+closes of one file by one process (bounded).
            let n: u64 = a(2).parse().unwrap();
            let path = c(&a(1));
            for _ in 0..n {
                let fd = check(unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) } as i64);
                unsafe { libc::close(fd as i32) };
            }
            println!("opened={n}");
        }
        "connect-flood" => {
            // Optionally become a holder, then connects, each to a distinct
            // loopback address with no listener (refused at once), so no
            // de-duplication applies: at least MIN, then on until stdin
            // closes (the test's "stop", so the flood surely overlaps what
            // the test does meanwhile, however fast the machine), never more
            // than 100 x MIN. Prints how many it made.
            if a(1) != "-" {
                hold(check(
                    unsafe { libc::open(c(&a(1)).as_ptr(), libc::O_RDONLY) } as i64,
                ));
            }
            let min: u32 = a(2).parse().unwrap();
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stop_w = stop.clone();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
                stop_w.store(true, std::sync::atomic::Ordering::Relaxed);
            });
            println!("started");
            std::io::stdout().flush().unwrap();
            let cap = min.saturating_mul(100);
            let mut n = 0u32;
            while n < cap && (n < min || !stop.load(std::sync::atomic::Ordering::Relaxed)) {
                // 127.77.0.0 up: distinct for up to 2^24 connects.
                let ip =
                    std::net::Ipv4Addr::new(127, 77 + (n >> 16) as u8, (n >> 8) as u8, n as u8);
                let port = 20000 + (n % 1000) as u16;
                let _ = TcpStream::connect_timeout(
                    &SocketAddr::new(IpAddr::V4(ip), port),
                    Duration::from_millis(100),
                );
                n += 1;
            }
            println!("done={n}");
        }
        "connect-seq" => {
            // connect-seq IP STEP...: STEP is PORTxN (N connects to PORT,
            // each closed at once) or +MS (sleep). Bounded by the steps.
            let ip = a(1);
            for step in std::env::args().skip(3) {
                if let Some(ms) = step.strip_prefix('+') {
                    std::thread::sleep(Duration::from_millis(ms.parse().unwrap()));
                    continue;
                }
                let (port, n) = step.split_once('x').expect("PORTxN");
                for _ in 0..n.parse::<u32>().unwrap() {
                    connect_quiet(&ip, port);
                }
            }
            println!("connected");
        }
        "read-connect" => {
            // The attack: obtain the credential, then use it elsewhere.
            let _ = std::fs::read(a(1)).map_err(|e| {
                println!("errno={}", e.raw_os_error().unwrap_or(0));
                std::process::exit(3)
            });
            connect(&a(2), &a(3));
        }
        other => panic!("unknown probe command {other}"),
    }
}

fn connect(ip: &str, port: &str) {
    let addr = SocketAddr::new(ip.parse().unwrap(), port.parse().unwrap());
    match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(_) => println!("connected"),
        Err(e) => {
            println!("errno={}", e.raw_os_error().unwrap_or(0));
            std::process::exit(3);
        }
    }
}

/// `connect` without the "connected" line.
fn connect_quiet(ip: &str, port: &str) {
    let addr = SocketAddr::new(ip.parse().unwrap(), port.parse().unwrap());
    if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        println!("errno={}", e.raw_os_error().unwrap_or(0));
        std::process::exit(3);
    }
}

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    check(unsafe { libc::pipe(fds.as_mut_ptr()) } as i64);
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}
