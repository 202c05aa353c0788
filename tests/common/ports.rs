//! Ports for processes a test starts that bind by themselves (`taskd serve`, `taskd worker`,
//! `redis-server`). They are picked below the kernel's ephemeral range (`ip_local_port_range`,
//! 32768–60999 by default): a port the OS hands out for `bind(0)` is free only until some
//! outgoing connection of a test running alongside takes it as its source port, which can happen
//! between the check and the child's own bind.
// Not every test binary that includes this module uses both functions.
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener};

/// Where the ports come from: above the well-known and registered ports most services use,
/// below the ephemeral range.
const RANGE: std::ops::Range<u16> = 10_000..32_000;

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    free_port_range(1)
}

/// A port for a Redis Cluster node: free, and so is its cluster-bus port (the port + 10000),
/// which stays below the ephemeral range too.
pub fn free_cluster_port() -> u16 {
    for _ in 0..200 {
        let port = rand::random_range(RANGE.start..RANGE.end - 10_000);
        let free = [port, port + 10_000]
            .iter()
            .all(|&p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok());
        if free {
            return port;
        }
    }
    panic!("no free port with a free cluster-bus port in {RANGE:?}");
}

/// The first of `count` consecutive ports that are all free right now.
pub fn free_port_range(count: u16) -> u16 {
    for _ in 0..200 {
        let base = rand::random_range(RANGE.start..RANGE.end - count);
        let free =
            (base..base + count).all(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no {count} consecutive free ports in {RANGE:?}");
}
