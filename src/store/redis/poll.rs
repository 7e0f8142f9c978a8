//! The poller and the subscriber: threads that turn peers' writes (new versions,
//! cool-downs, verdicts) into `FleetEvent`s, and put back what Redis lost.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::Commands;

use super::fleet::{why_of, Fleet, Live};
use super::FleetEvent;
use crate::clock;
use crate::store::StoreError;

impl Fleet {
    /// The poller and the subscriber, on threads of their own (blocking Redis calls never
    /// run on the runtime).
    pub fn start(self: &Arc<Self>) {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("tokenrelay-fleet-poll".into())
            .spawn(move || loop {
                std::thread::sleep(me.cfg.poll_interval);
                if Arc::strong_count(&me) == 1 {
                    return;
                }
                me.poll_once();
            })
            .ok();
        if self.cfg.pubsub {
            let me = Arc::clone(self);
            std::thread::Builder::new()
                .name("tokenrelay-fleet-sub".into())
                .spawn(move || loop {
                    if Arc::strong_count(&me) == 1 {
                        return;
                    }
                    me.listen();
                    std::thread::sleep(Duration::from_secs(1));
                })
                .ok();
        }
    }

    fn listen(&self) {
        let Ok(mut conn) = self.client.get_connection_with_timeout(self.cfg.op_timeout) else {
            return;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut pubsub = conn.as_pubsub();
        if pubsub.subscribe(self.channel()).is_err() {
            return;
        }
        // (Re)subscribed: whatever was published meanwhile is caught up by re-reading.
        let _ = self.events.send(FleetEvent::Reconnected);
        loop {
            match pubsub.get_message() {
                Ok(msg) => {
                    let payload: String = msg.get_payload().unwrap_or_default();
                    let Some((name, what)) = payload.rsplit_once(' ') else {
                        continue;
                    };
                    let Some(member) = self.member(name) else {
                        continue;
                    };
                    match (what, &member) {
                        ("cool" | "dead" | "verdict", _) => {
                            let _ = self.read_shared(name, &member);
                        }
                        (_, Live::Record(s)) => {
                            let _ = self.events.send(FleetEvent::Changed {
                                provider: s.provider.clone(),
                                id: s.id.clone(),
                            });
                        }
                        (_, Live::Key(_)) => {}
                    }
                }
                Err(e) if e.is_timeout() => continue,
                Err(_) => return,
            }
        }
    }

    /// One round: every record's version against ours (lost records re-asserted), and
    /// every credential's shared cool-downs and verdicts.
    fn poll_once(&self) {
        let members: Vec<(String, Live)> = {
            let mut map = self.members.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, m| m.upgrade().is_some());
            map.iter()
                .filter_map(|(n, m)| Some((n.clone(), m.upgrade()?)))
                .collect()
        };
        for (name, member) in members {
            if let Live::Record(s) = &member {
                let key = s.rec_key();
                let v: Result<Option<u64>, _> = self.run("poll", |c| c.hget(&key, "v"));
                match v {
                    Ok(Some(v)) if v > s.seen.load(Ordering::Acquire) => {
                        let _ = self.events.send(FleetEvent::Changed {
                            provider: s.provider.clone(),
                            id: s.id.clone(),
                        });
                    }
                    Ok(stored) => {
                        if stored.unwrap_or(0) < s.seen.load(Ordering::Acquire) {
                            s.reassert();
                        }
                    }
                    Err(_) => return,
                }
            }
            if self.read_shared(&name, &member).is_err() {
                return;
            }
        }
    }

    /// Peers' cool-downs and verdicts on one credential, in one round trip, applied here.
    fn read_shared(&self, name: &str, member: &Live) -> Result<(), StoreError> {
        let (provider, id) = name.split_once('/').unwrap_or((name, ""));
        let (cool_key, state_key) = (self.key(name, "cool"), self.key(name, "state"));
        let (cools, (dead, verdict)): (HashMap<String, i64>, (Option<String>, Option<String>)) =
            self.run("shared", |c| {
                redis::pipe()
                    .hgetall(&cool_key)
                    .cmd("HMGET")
                    .arg(&state_key)
                    .arg("needs_reauth")
                    .arg("invalid")
                    .query(c)
            })?;
        let now = clock::now_ms();
        for (model, &until_ms) in cools.iter().filter(|(m, _)| !m.starts_with('~')) {
            if until_ms <= now {
                continue;
            }
            let (reason, scope) = why_of(cools.get(&format!("~{model}")).copied());
            let _ = self.events.send(FleetEvent::Cooldown {
                provider: provider.into(),
                id: id.into(),
                model: (model != "*").then(|| model.clone()),
                until_ms,
                reason,
                scope,
            });
        }
        // Keyed by the version it was found at: a new record (a re-login) is not dead.
        if let (Live::Record(s), Some((v, message))) =
            (member, dead.as_deref().and_then(|d| d.split_once('|')))
        {
            if v.parse::<u64>().ok() == Some(s.seen.load(Ordering::Acquire)) {
                let _ = self.events.send(FleetEvent::NeedsReauth {
                    provider: provider.into(),
                    id: id.into(),
                    message: message.to_string(),
                });
            }
        }
        let mut mine = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        match verdict {
            Some(value) => {
                if mine.get(name).is_some_and(|m| *m != value) {
                    // Someone replaced this replica's verdict (an operator brought it back).
                    mine.remove(name);
                }
                drop(mine);
                if let Some((tag, message)) = value.split_once('|') {
                    if tag == member.tag() {
                        let _ = self.events.send(FleetEvent::Invalid {
                            provider: provider.into(),
                            id: id.into(),
                            message: (!message.is_empty()).then(|| message.to_string()),
                        });
                    }
                }
            }
            // Redis lost it (restarted empty): this replica's verdict goes back.
            None => {
                if let Some(value) = mine.get(name).cloned() {
                    drop(mine);
                    let _: Result<(), _> =
                        self.run("state", |c| c.hset(&state_key, "invalid", &value));
                }
            }
        }
        Ok(())
    }
}
