//! The TCP line service: one thread per connection, the console's commands plus `count`,
//! `echo` and `bye`. A connection is greeted with `AGENT HELLO conn=N`.

use crate::agent::{Agent, Conn, Next};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Accepts connections for ever (on its own thread).
pub fn serve(agent: Arc<Agent>, listener: TcpListener) {
    let _ = std::thread::Builder::new().name("tcp".into()).spawn(move || {
        for s in listener.incoming() {
            match s {
                Ok(s) => {
                    let id = agent.conns_total.fetch_add(1, Ordering::Relaxed) + 1;
                    let a = agent.clone();
                    let _ = std::thread::Builder::new().name(format!("conn{id}")).spawn(move || {
                        a.conns_open.fetch_add(1, Ordering::Relaxed);
                        connection(&a, s, id);
                        a.conns_open.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                // EMFILE and the like: do not spin.
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
    });
}

fn connection(agent: &Agent, s: TcpStream, id: u64) {
    let _ = s.set_nodelay(true);
    let Ok(mut w) = s.try_clone() else { return };
    let mut conn = Conn { id, count: 0 };
    if w.write_all(format!("AGENT HELLO conn={id}\n").as_bytes()).is_err() {
        return;
    }
    let mut r = BufReader::new(s);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Lines are bounded: a peer sending 64 KiB without a newline is cut off.
        match (&mut r).take(65536).read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !buf.ends_with(b"\n") && buf.len() >= 65536 {
            let _ = w.write_all(b"ERROR line too long\n");
            return;
        }
        let line = String::from_utf8_lossy(&buf).into_owned();
        let mut failed = false;
        let next = agent.command(&line, &mut conn, &mut |l: &str| {
            failed |= w.write_all(format!("{l}\n").as_bytes()).is_err();
        });
        if failed || next == Next::Close {
            return;
        }
    }
}
