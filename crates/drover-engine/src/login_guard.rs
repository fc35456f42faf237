//! Login throttling, the same for every API's login (native token, VRO token, EM logon).
//!
//! Two limits, the usual design against password guessing that cannot be turned into a way to
//! lock a user out for good:
//! - per **(user, address)** pair: a few free failures, then each further attempt must wait an
//!   exponentially growing time (1 s, 2 s, 4 s, ...) up to a temporary lockout
//!   ([`ThrottlePolicy::max_lock`]). Only that pair is affected: the same user from another
//!   address logs in as usual, so an attacker cannot lock the administrator out everywhere.
//! - per **address** (IPv6 by its /64): more failures than [`ThrottlePolicy::address_free`] from
//!   one address, for any users, lock that address with the same backoff: a guesser spreading its
//!   attempts over many user names is stopped too.
//!
//! A throttled attempt is refused before any password is checked, so it costs no argon2 work. A
//! success clears its pair. The state lives in memory (a restart forgets it, as it forgets
//! nothing else that matters: the lockouts are minutes long) and is bounded in size.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limits. The defaults are what a user of a serious product expects.
#[derive(Debug, Clone)]
pub struct ThrottlePolicy {
    /// Failures of one (user, address) pair before backoff starts.
    pub pair_free: u32,
    /// Failures from one address (any users) within `window` before backoff starts.
    pub address_free: u32,
    /// How long failures are remembered after the last one (longer than `max_lock`, so a
    /// guesser that waits out a lockout is locked out again at its next failure).
    pub window: Duration,
    /// The longest a pair or an address is locked for: the lockout.
    pub max_lock: Duration,
    /// At most this many pairs and addresses are tracked (memory bound); past it, expired
    /// entries are dropped, and if none are, new pairs are not tracked (the address limit still is).
    pub max_entries: usize,
}

impl Default for ThrottlePolicy {
    fn default() -> Self {
        ThrottlePolicy {
            pair_free: 3,
            address_free: 20,
            window: Duration::from_secs(60 * 60),
            max_lock: Duration::from_secs(15 * 60),
            max_entries: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    locked_until: Option<Instant>,
    last_failure: Instant,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry { failures: 0, locked_until: None, last_failure: now }
    }

    /// How long this entry still refuses attempts.
    fn wait(&self, now: Instant) -> Option<Duration> {
        self.locked_until.and_then(|t| t.checked_duration_since(now)).filter(|d| !d.is_zero())
    }

    /// Counts a failure; returns the lock it starts, if any.
    fn fail(&mut self, now: Instant, free: u32, max_lock: Duration) -> Option<Duration> {
        self.failures = self.failures.saturating_add(1);
        self.last_failure = now;
        if self.failures <= free {
            return None;
        }
        let exponent = (self.failures - free - 1).min(20);
        let lock = Duration::from_secs(1u64 << exponent).min(max_lock);
        self.locked_until = Some(now + lock);
        Some(lock)
    }

    fn expired(&self, now: Instant, window: Duration) -> bool {
        self.wait(now).is_none() && now.duration_since(self.last_failure) > window
    }
}

/// Why an attempt is refused without a password check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttled {
    pub retry_after: Duration,
    /// Whether the address as a whole is locked (not only this user from it).
    pub address: bool,
}

/// What a failure started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockStarted {
    pub lock: Duration,
    pub failures: u32,
    pub address: bool,
}

#[derive(Debug, Default)]
struct State {
    pairs: HashMap<(String, Option<IpAddr>), Entry>,
    addresses: HashMap<IpAddr, Entry>,
}

#[derive(Debug, Default)]
pub struct LoginGuard {
    policy: ThrottlePolicy,
    state: Mutex<State>,
}

/// The key an address is limited by: IPv6 clients usually hold a whole /64.
fn address_key(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V4(_) => a,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

fn user_key(user: &str) -> String {
    user.rsplit('\\').next().unwrap_or(user).to_lowercase()
}

impl LoginGuard {
    pub fn new(policy: ThrottlePolicy) -> LoginGuard {
        LoginGuard { policy, state: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether an attempt of `user` from `from` may go ahead now.
    pub fn check(&self, user: &str, from: Option<IpAddr>, now: Instant) -> Result<(), Throttled> {
        let state = self.lock();
        if let Some(wait) = from.and_then(|a| state.addresses.get(&address_key(a))).and_then(|e| e.wait(now)) {
            return Err(Throttled { retry_after: wait, address: true });
        }
        if let Some(wait) = state.pairs.get(&(user_key(user), from.map(address_key))).and_then(|e| e.wait(now)) {
            return Err(Throttled { retry_after: wait, address: false });
        }
        Ok(())
    }

    /// Counts a failed attempt; returns the lock it started, if any (the address's first).
    pub fn failed(&self, user: &str, from: Option<IpAddr>, now: Instant) -> Option<LockStarted> {
        let p = &self.policy;
        let mut state = self.lock();
        let State { pairs, addresses } = &mut *state;
        if pairs.len() + addresses.len() >= p.max_entries {
            pairs.retain(|_, e| !e.expired(now, p.window));
            addresses.retain(|_, e| !e.expired(now, p.window));
        }
        let room = pairs.len() + addresses.len() < p.max_entries;
        let mut started = None;
        if let Some(a) = from.map(address_key)
            && (room || addresses.contains_key(&a))
        {
            let e = addresses.entry(a).or_insert_with(|| Entry::new(now));
            if e.expired(now, p.window) {
                *e = Entry::new(now);
            }
            if let Some(lock) = e.fail(now, p.address_free, p.max_lock) {
                started = Some(LockStarted { lock, failures: e.failures, address: true });
            }
        }
        let key = (user_key(user), from.map(address_key));
        if room || pairs.contains_key(&key) {
            let e = pairs.entry(key).or_insert_with(|| Entry::new(now));
            if e.expired(now, p.window) {
                *e = Entry::new(now);
            }
            if let Some(lock) = e.fail(now, p.pair_free, p.max_lock) {
                started = started.or(Some(LockStarted { lock, failures: e.failures, address: false }));
            }
        }
        started
    }

    /// A successful login clears its pair (not its address: one good account must not wipe out
    /// the failures a guesser made from the same address).
    pub fn succeeded(&self, user: &str, from: Option<IpAddr>) {
        self.lock().pairs.remove(&(user_key(user), from.map(address_key)));
    }

    /// How many pairs and addresses are tracked (for tests of the memory bound).
    pub fn tracked(&self) -> usize {
        let s = self.lock();
        s.pairs.len() + s.addresses.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1)));
    const B: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2)));

    #[test]
    fn a_pair_backs_off_exponentially_up_to_the_lockout_and_only_that_pair() {
        let g = LoginGuard::new(ThrottlePolicy { address_free: 1000, ..Default::default() });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(g.check("admin", A, t0).is_ok());
            assert_eq!(g.failed("admin", A, t0), None);
        }
        // The fourth failure locks the pair for 1 s, the fifth for 2 s, ...
        assert_eq!(g.failed("admin", A, t0).map(|l| l.lock), Some(Duration::from_secs(1)));
        assert_eq!(g.check("ADMIN", A, t0).unwrap_err().retry_after, Duration::from_secs(1));
        assert!(!g.check("CORP\\admin", A, t0).unwrap_err().address);
        assert!(g.check("admin", A, t0 + Duration::from_millis(1001)).is_ok());
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(g.failed("admin", A, t1).map(|l| l.lock), Some(Duration::from_secs(2)));
        let mut t = t1;
        for _ in 0..30 {
            t += Duration::from_secs(100);
            g.failed("admin", A, t);
        }
        assert_eq!(g.check("admin", A, t).unwrap_err().retry_after, Duration::from_secs(15 * 60));
        // The same user from elsewhere, and another user from here, are not affected.
        assert!(g.check("admin", B, t).is_ok());
        assert!(g.check("alice", A, t).is_ok());
        // The lockout ends by itself, and the next failure locks the pair out again at once.
        let after = t + Duration::from_secs(15 * 60 + 1);
        assert!(g.check("admin", A, after).is_ok());
        assert_eq!(g.failed("admin", A, after).map(|l| l.lock), Some(Duration::from_secs(15 * 60)));
        // A success clears the pair.
        g.succeeded("admin", A);
        assert!(g.check("admin", A, t).is_ok());
    }

    #[test]
    fn an_address_guessing_many_names_is_locked_as_a_whole() {
        let g = LoginGuard::new(ThrottlePolicy::default());
        let t = Instant::now();
        let mut started = None;
        for i in 0..21 {
            started = g.failed(&format!("user{i}"), A, t).or(started);
        }
        assert_eq!(started, Some(LockStarted { lock: Duration::from_secs(1), failures: 21, address: true }));
        let refused = g.check("someone-else", A, t).unwrap_err();
        assert!(refused.address);
        assert!(g.check("someone-else", B, t).is_ok());
        // In-process logins (no address) are limited per user only.
        assert!(g.check("someone-else", None, t).is_ok());
    }

    #[test]
    fn ipv6_clients_are_limited_by_their_64() {
        let g = LoginGuard::new(ThrottlePolicy { address_free: 0, ..Default::default() });
        let t = Instant::now();
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        g.failed("x", Some(one), t);
        assert!(g.check("y", Some(same_64), t).is_err());
        assert!(g.check("y", Some(other_64), t).is_ok());
    }

    #[test]
    fn memory_is_bounded() {
        let g = LoginGuard::new(ThrottlePolicy { max_entries: 100, ..Default::default() });
        let t = Instant::now();
        for i in 0..10_000u32 {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x7f00_0000 + i));
            g.failed(&format!("u{i}"), Some(a), t);
        }
        assert!(g.tracked() <= 100, "{}", g.tracked());
        // Once the window has passed, the old entries make room again.
        let later = t + Duration::from_secs(2 * 3600);
        g.failed("new", A, later);
        assert!(g.tracked() <= 3, "{}", g.tracked());
    }
}
