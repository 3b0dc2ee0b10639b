//! Membership: workers that discovery finds, refusals, departed workers leaving the state, and
//! nodes that share an id.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Member, Supervisor};
use crate::discovery::{Heard, now_ms};
use crate::head::{NodeState, Refused};

/// Refusals remembered (by source and reason).
const MAX_REFUSED: usize = 32;
/// Addresses remembered per announcing worker process.
const MAX_ADDRESSES: usize = 8;

impl Supervisor {
    /// An announcement heard: a new worker joins the members (and is connected to at once), a
    /// known or forgotten one is refreshed; a refusal is listed. A worker process heard at
    /// several addresses (IPv4 and IPv6, several interfaces) is one member, at the address heard
    /// first; the others are tried in turn while it does not connect ([`Self::next_address`]).
    pub(super) fn heard(&mut self, h: Heard) {
        match h {
            Heard::Node { addr, announcement } => {
                let key = addr.to_string();
                let sender = (announcement.node_id.clone(), announcement.instance);
                let found = self.members.iter().position(|m| m.addr == key).or_else(|| {
                    self.members
                        .iter()
                        .position(|m| m.announced.as_ref() == Some(&sender))
                });
                match found {
                    Some(i) => {
                        let m = &mut self.members[i];
                        m.last_heard = Instant::now();
                        if m.duplicate && m.announced.as_ref() != Some(&sender) {
                            // another process there now: perhaps no longer the listed one
                            m.duplicate = false;
                            m.last_try = None;
                            let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                            sh.forgotten.remove(&i);
                        }
                        m.announced = Some(sender);
                        if !m.heard_at.contains(&key) && m.heard_at.len() < MAX_ADDRESSES {
                            m.heard_at.push(key);
                        }
                        if m.forgotten {
                            m.forgotten = false;
                            m.last_try = None;
                            tracing::info!(worker = %m.addr, id = %announcement.node_id, "a departed worker is back");
                            let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                            sh.forgotten.remove(&i);
                        }
                    }
                    None => {
                        tracing::info!(
                            worker = %key,
                            id = %announcement.node_id,
                            host = %announcement.hostname,
                            "discovered a worker"
                        );
                        let mut m = Member::new(key.clone(), true);
                        m.announced = Some(sender);
                        m.heard_at.push(key.clone());
                        self.members.push(m);
                        let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                        let mut n = NodeState::waiting(key, true);
                        n.id = announcement.node_id;
                        n.hostname = announcement.hostname;
                        sh.nodes.push(n);
                    }
                }
            }
            Heard::Refused { from, why } => self.refuse(&from.ip().to_string(), &why.to_string()),
        }
    }

    /// After a failed connection, a discovered worker heard at other addresses moves to the next
    /// of them (in the order heard, round again): tried at once, the first again a second later.
    pub(super) fn next_address(&mut self, i: usize) {
        let m = &mut self.members[i];
        if !m.discovered || m.heard_at.len() < 2 {
            return;
        }
        let at = m.heard_at.iter().position(|a| *a == m.addr).unwrap_or(0);
        let k = (at + 1) % m.heard_at.len();
        let next = m.heard_at[k].clone();
        tracing::info!(from = %m.addr, to = %next, "trying a worker at another address it announces from");
        m.addr = next.clone();
        if k != 0 {
            // the next address at once; a second a round, as for any member
            m.last_try = None;
        }
        let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = sh.nodes.get_mut(i + 1) {
            n.addr = next;
        }
    }

    /// Whether discovered member `i` announces the node id of another member that is up (the
    /// worker it refused a second link for; not its own earlier link, still open at its end).
    pub(super) fn serves_as_another(&self, i: usize) -> bool {
        let m = &self.members[i];
        let Some((id, _)) = m.announced.as_ref().filter(|_| m.discovered) else {
            return false;
        };
        self.members
            .iter()
            .enumerate()
            .any(|(j, o)| j != i && o.up.as_ref().is_some_and(|u| u.advert.node_id == *id))
    }

    /// A discovered member turned out to be a worker that serves this head already, through a
    /// member listed under another address: it leaves the state (no second row, no refusal).
    pub(super) fn hide_duplicate(&mut self, i: usize) {
        let m = &mut self.members[i];
        m.duplicate = true;
        tracing::info!(worker = %m.addr, "discovered at another address of a worker already serving; not a member");
        let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        sh.forgotten.insert(i);
    }

    /// Lists a refusal (logged the first time a source is refused for a reason).
    pub(super) fn refuse(&self, from: &str, reason: &str) {
        let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let now = now_ms();
        if let Some(r) = sh
            .refused
            .iter_mut()
            .find(|r| r.from == from && r.reason == reason)
        {
            r.count += 1;
            r.last_ms = now;
            return;
        }
        // a flood from many sources logs a line a second, not a line a packet
        let last = self.refusal_logged_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000 {
            self.refusal_logged_ms.store(now, Ordering::Relaxed);
            tracing::warn!(%from, %reason, "refused a node");
        }
        if sh.refused.len() >= MAX_REFUSED {
            // the oldest goes
            if let Some(oldest) = (0..sh.refused.len()).min_by_key(|&i| sh.refused[i].last_ms) {
                sh.refused.remove(oldest);
            }
        }
        sh.refused.push(Refused {
            from: from.to_string(),
            reason: reason.to_string(),
            count: 1,
            last_ms: now,
        });
    }

    /// Discovered workers down and silent past `forget_after` leave the state (no ghost in the
    /// status or the plan); one that announces itself again comes back.
    pub(super) fn forget_departed(&mut self) {
        let after = self.opts.ops.forget_after;
        for i in 0..self.members.len() {
            let m = &mut self.members[i];
            if m.discovered && !m.forgotten && m.up.is_none() && m.last_heard.elapsed() >= after {
                m.forgotten = true;
                tracing::info!(worker = %m.addr, silent_s = after.as_secs(), "a departed worker leaves the cluster");
                let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                sh.forgotten.insert(i);
                if let Some(n) = sh.nodes.get_mut(i + 1) {
                    n.layers = None;
                }
            }
        }
    }

    /// Nodes up now that share an id (a copied cache directory) are told apart by address, kept
    /// both, and each is warned about the other.
    pub(super) fn check_duplicates(&self) {
        let head_id = {
            let sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            sh.nodes[0].id.clone()
        };
        let ids: Vec<(usize, String)> = self
            .members
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.up.as_ref().map(|u| (i, u.advert.node_id.clone())))
            .collect();
        let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..self.members.len() {
            let Some(n) = sh.nodes.get(i + 1) else {
                continue;
            };
            let mine = ids.iter().find(|(j, _)| *j == i).map(|(_, id)| id.clone());
            let warning = mine.filter(|id| !id.is_empty()).and_then(|id| {
                let mut others: Vec<String> = ids
                    .iter()
                    .filter(|(j, other)| *j != i && *other == id)
                    .map(|(j, _)| self.members[*j].addr.clone())
                    .collect();
                if id == head_id {
                    others.push("the head".into());
                }
                (!others.is_empty()).then(|| {
                    format!(
                        "node id {id} is also the id of {}: a copied cache directory? Delete `node-id` in one of their cache directories and restart it",
                        others.join(", ")
                    )
                })
            });
            if warning.is_some() && n.warning != warning {
                tracing::warn!(worker = %self.members[i].addr, "{}", warning.as_deref().unwrap_or(""));
            }
            sh.nodes[i + 1].warning = warning;
        }
        let head_dup = !head_id.is_empty() && ids.iter().any(|(_, id)| *id == head_id);
        sh.nodes[0].warning = head_dup
            .then(|| format!("node id {head_id} is also a worker's: a copied cache directory?"));
    }

    /// Members benched for an unusable link return to planning when their time is up.
    pub(super) fn unbench(&mut self) {
        let now = Instant::now();
        for m in &mut self.members {
            if m.benched_until.is_some_and(|t| now >= t) {
                m.benched_until = None;
                tracing::info!(worker = %m.addr, "trying a benched worker again");
                self.dirty = true;
            }
        }
    }
}
