#![allow(dead_code)]

//! Hosts of a test's own, made of Linux network namespaces: a [`Namespace`] is a host with its
//! own loopback and addresses; a [`Lan`] joins several on one switch (a bridge in a namespace of
//! its own), each with an address of a /24 picked at random, so a test can run the binaries as
//! separate machines and pull one's cable ([`Lan::cut`]: packets vanish, nothing answers with a
//! reset, as when a machine dies). Everything is removed on drop, processes in them killed.
//! Traffic goes only to these addresses and loopback.
//!
//! Needs root (`ip netns`); [`Namespace::new`] returns `None` where it is not permitted.

use std::{
    ffi::OsStr,
    future::Future,
    net::Ipv4Addr,
    process::{Command, Output},
};

/// A network namespace with its loopback up; deleted, and anything left in it killed, on drop.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    /// `None` when this machine does not let the test make one.
    pub fn new(prefix: &str) -> Option<Self> {
        let name = format!(
            "{prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let made = Command::new("ip").args(["netns", "add", &name]).output();
        if !made.is_ok_and(|o| o.status.success()) {
            return None;
        }
        let ns = Self { name };
        ns.run(["ip", "link", "set", "lo", "up"]);
        Some(ns)
    }

    /// `args` run inside the namespace (not yet started).
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(args);
        command
    }

    pub fn exec<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command(args).output().expect("run ip netns exec")
    }

    /// Runs a set-up command inside the namespace; panics when it fails.
    #[track_caller]
    pub fn run<I, S>(&self, args: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let output = self.exec(args);
        assert!(
            output.status.success(),
            "in {}: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Processes running in the namespace.
    pub fn pids(&self) -> Vec<String> {
        let output = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .expect("ip netns pids");
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// `curl -s` inside the namespace; the body.
    pub fn curl(&self, args: &[&str]) -> String {
        let output = self.exec(["curl", "-s", "--max-time", "10"].iter().chain(args));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs `future` on a thread of its own that has joined this namespace, so every socket it
    /// opens is this host's (a client on this host); returns its output.
    pub fn block_on<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open the namespace");
            use std::os::fd::AsRawFd;
            // SAFETY: setns(2) on a descriptor we own; it changes only this thread's namespace.
            let joined = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(joined, 0, "setns: {}", std::io::Error::last_os_error());
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(future)
        })
        .join()
        .expect("the namespace's thread panicked")
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// One host of a [`Lan`].
pub struct Host {
    pub ns: Namespace,
    pub addr: Ipv4Addr,
    /// The switch's end of the host's cable.
    port: String,
}

/// Hosts on one switch, in `10.<n>.0.0/24` (`n` random, so two tests do not clash).
pub struct Lan {
    /// Declared first: hosts go before their switch.
    pub hosts: Vec<Host>,
    switch: Namespace,
}

impl Lan {
    /// A switch and one host per name (`.2`, `.3`, ... in the order given); `None` where
    /// namespaces cannot be made.
    pub fn new(names: &[&str]) -> Option<Self> {
        let switch = Namespace::new("tk-sw")?;
        switch.run(["ip", "link", "add", "br0", "type", "bridge"]);
        switch.run(["ip", "link", "set", "br0", "up"]);
        let net = 16 + rand::random::<u8>() % 200;
        let mut hosts = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let ns = Namespace::new(&format!("tk-{name}"))?;
            let addr = Ipv4Addr::new(10, net, 0, 2 + i as u8);
            let port = format!("p{i}");
            // The pair is made in the switch; one end moves into the host and is renamed eth0.
            switch.run([
                "ip", "link", "add", &port, "type", "veth", "peer", "name", "tmp0",
            ]);
            switch.run(["ip", "link", "set", "tmp0", "netns", &ns.name]);
            switch.run(["ip", "link", "set", &port, "master", "br0"]);
            switch.run(["ip", "link", "set", &port, "up"]);
            ns.run(["ip", "link", "set", "tmp0", "name", "eth0"]);
            ns.run(["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ns.run(["ip", "link", "set", "eth0", "up"]);
            hosts.push(Host { ns, addr, port });
        }
        Some(Self { hosts, switch })
    }

    pub fn host(&self, index: usize) -> &Host {
        &self.hosts[index]
    }

    /// Pulls host `index`'s cable: its switch port goes down, so everything to and from it is
    /// dropped silently (no reset, no "unreachable"); connections survive until it is back, as
    /// over a real cable.
    pub fn cut(&self, index: usize) {
        self.switch
            .run(["ip", "link", "set", &self.hosts[index].port, "down"]);
    }

    /// Plugs it back in.
    pub fn restore(&self, index: usize) {
        self.switch
            .run(["ip", "link", "set", &self.hosts[index].port, "up"]);
    }
}
