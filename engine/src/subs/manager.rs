//! The manager thread: it owns every subscription, takes commands and change notices, sends queries to the workers and turns their answers into numbered events.

use super::*;

/// A reply to a subscriber waiting for its subscription.
pub(super) type Reply = oneshot::Sender<Result<Attached, SubsError>>;

/// A subscriber waiting for rows from the query threads.
pub(super) struct Waiter {
    pub(super) skip_rows: bool,
    pub(super) reply: Reply,
}

/// What the query out for a subscription is for.
pub(super) enum Purpose {
    /// A new subscription's first rows, in the query's order; its subscribers wait in
    /// `Work::waiting`.
    First,
    /// The whole result, to reconcile with (notices were lost, or after a restart).
    Full,
    /// The rows in the query's order, for these subscribers.
    Ordered(Vec<Waiter>),
    /// The rows of these changed keys (packed, per alias queried, in the order of the
    /// job's queries).
    Keys(Vec<(usize, Vec<Vec<u8>>)>),
}

/// A subscription's dealings with the query threads.
pub(super) struct Work {
    /// The query out, if any: one at a time, so answers apply in the order the data changed.
    pub(super) busy: Option<Purpose>,
    /// Its last query took longer than [`workers::QUICK`]: its next ones are heavy.
    pub(super) slow: bool,
    /// Reconcile with the whole result next.
    pub(super) full: bool,
    /// Changed keys per alias (packed -> values) not yet queried.
    pub(super) keys: Vec<BTreeMap<Vec<u8>, Vec<Value>>>,
    /// Subscribers waiting for the rows.
    pub(super) waiting: Vec<Waiter>,
    /// The last query sent was a whole pass (see [`Work::next`]).
    pub(super) last_full: bool,
}

/// What a subscription's next query is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// The whole result.
    Full,
    /// The rows in order, for the waiting subscribers.
    Ordered,
    /// The changed keys' rows.
    Keys,
}

pub(super) struct Manager {
    /// Plans subscriptions (prepares their queries); runs none: the query threads do.
    pub(super) reader: Connection,
    /// Heavy queries' thread.
    pub(super) workers: Workers,
    /// Quick queries run here, on the manager thread (None until the first).
    pub(super) inline: Option<Worker>,
    pub(super) storage: Connection,
    pub(super) config: SubsConfig,
    pub(super) matchers: Vec<Matcher>,
    /// Events stored in the open transaction, sent when it commits.
    pub(super) pending: Vec<(usize, Vec<Arc<ChangeEvent>>)>,
    /// True while any subscription exists: change notices are forwarded only then.
    pub(super) any: Arc<std::sync::atomic::AtomicBool>,
}

impl Work {
    pub(super) fn new(aliases: usize) -> Work {
        Work {
            busy: None,
            slow: false,
            full: false,
            keys: vec![BTreeMap::new(); aliases],
            waiting: Vec::new(),
            last_full: false,
        }
    }

    /// What the next query is for, if there is work, as it goes out: a whole pass owed goes
    /// first (it covers every changed key), then the waiting subscribers' rows, then the
    /// changed keys. But subscribers waiting go before a whole pass that would follow another:
    /// a stream of bulk writes, each owing a whole pass, kept them waiting until their request
    /// timed out. Their rows are the data as it is then: the ordered pass turns what changed
    /// into events first, and the whole pass after it the rest (rows gone).
    pub(super) fn next(&mut self) -> Option<Next> {
        let waiters_first = self.last_full && !self.waiting.is_empty();
        let next = if self.full && !waiters_first {
            Next::Full
        } else if !self.waiting.is_empty() {
            Next::Ordered
        } else if self.keys.iter().any(|keys| !keys.is_empty()) {
            Next::Keys
        } else {
            return None;
        };
        self.last_full = next == Next::Full;
        Some(next)
    }
}

impl Manager {
    /// A manager with no subscription loaded yet; `answers` is its own channel, on which the
    /// heavy query thread replies.
    pub(super) fn new(
        reader: Connection,
        storage: Connection,
        db: &Path,
        config: SubsConfig,
        answers: mpsc::WeakSender<Command>,
        any: Arc<std::sync::atomic::AtomicBool>,
    ) -> Manager {
        Manager {
            reader,
            workers: Workers::new(db, config, answers),
            inline: None,
            storage,
            config,
            matchers: Vec::new(),
            pending: Vec::new(),
            any,
        }
    }

    pub(super) fn note_any(&self) {
        let any = !self.matchers.is_empty();
        self.any.store(any, std::sync::atomic::Ordering::SeqCst);
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(command) = rx.blocking_recv() {
            match command {
                Command::Changes(first) => {
                    // Merge every notice already queued: one pass for all of them.
                    let mut batches = vec![first];
                    let mut later = None;
                    let mut resync = false;
                    while let Ok(next) = rx.try_recv() {
                        match next {
                            Command::Changes(b) => batches.push(b),
                            Command::Resync => resync = true,
                            other => {
                                later = Some(other);
                                break;
                            }
                        }
                    }
                    if resync {
                        self.resync();
                    } else {
                        self.on_changes(&batches);
                    }
                    if let Some(command) = later {
                        self.handle(command);
                    }
                }
                other => self.handle(other),
            }
            self.note_any();
        }
    }

    pub(super) fn handle(&mut self, command: Command) {
        match command {
            Command::Subscribe {
                sql,
                skip_rows,
                from,
                reply,
            } => self.subscribe(&sql, skip_rows, from, reply),
            Command::Attach {
                id,
                skip_rows,
                from,
                reply,
            } => match self.position(&id) {
                Some(index) => self.attach(index, skip_rows, from, reply),
                None => {
                    let _ = reply.send(Err(SubsError::Unknown(id)));
                }
            },
            Command::Changes(batch) => self.on_changes(&[batch]),
            Command::Resync => self.resync(),
            Command::Done(done) => self.on_done(done),
            Command::Collect => self.collect(Instant::now()),
            Command::Remove { id, reply } => {
                let result = match self.position(&id) {
                    Some(index) => self.remove(index, "deleted by a client"),
                    None => Err(SubsError::Unknown(id)),
                };
                let _ = reply.send(result);
            }
            Command::List { reply } => {
                let now = Instant::now();
                let _ = reply.send(
                    self.matchers
                        .iter()
                        .map(|m| crate::http::types::SubscriptionInfo {
                            id: m.id.clone(),
                            hash: m.hash.clone(),
                            sql: m.sql.clone(),
                            columns: m.columns.clone(),
                            rows: m.rows.len(),
                            last_change_id: m.last_change_id,
                            subscribers: m.live.receiver_count(),
                            idle_s: m.idle_since.map(|at| now.duration_since(at).as_secs_f64()),
                        })
                        .collect(),
                );
            }
        }
    }

    /// The connection quick queries run on, opened with the first.
    pub(super) fn inline_worker(&mut self) -> Result<&mut Worker, SubsError> {
        if self.inline.is_none() {
            self.inline = Some(self.workers.open_inline()?);
        }
        Ok(self.inline.as_mut().expect("opened just now"))
    }

    pub(super) fn position(&self, id: &str) -> Option<usize> {
        self.matchers.iter().position(|m| m.id == id)
    }

    /// [`Manager::position`], trying `hint` first: the index a subscription had a moment
    /// ago, which holds unless one before it went. Why: a change to a table that a thousand
    /// subscriptions read made each of them look itself up by id among all of them, twice,
    /// a quadratic cost that dominated the change's handling.
    pub(super) fn find(&self, id: &str, hint: usize) -> Option<usize> {
        match self.matchers.get(hint) {
            Some(matcher) if matcher.id == id => Some(hint),
            _ => self.position(id),
        }
    }

    /// The subscription nobody has listened to for the longest, if any (one still running its
    /// first query is not a candidate).
    pub(super) fn longest_unused(&self) -> Option<usize> {
        let now = Instant::now();
        self.matchers
            .iter()
            .enumerate()
            .filter(|(_, m)| m.ready && !m.waited_on() && m.live.receiver_count() == 0)
            .min_by_key(|(_, m)| m.idle_since.unwrap_or(now))
            .map(|(index, _)| index)
    }

    /// Removes the subscriptions nobody has listened to for the idle timeout.
    pub(super) fn collect(&mut self, now: Instant) {
        let idle_timeout = self.config.idle_timeout;
        let mut expired = Vec::new();
        for (index, matcher) in self.matchers.iter_mut().enumerate() {
            if matcher.live.receiver_count() > 0 || matcher.waited_on() {
                matcher.idle_since = None;
                continue;
            }
            let since = *matcher.idle_since.get_or_insert(now);
            if now.duration_since(since) >= idle_timeout {
                expired.push(index);
            }
        }
        for index in expired.into_iter().rev() {
            if let Err(e) = self.remove(index, "nobody listened for the idle timeout") {
                tracing::warn!("subscriptions: collecting failed: {e}");
            }
        }
    }

    /// Forgets a subscription: storage, rows, history; its subscribers' streams end (their
    /// receiver is closed), and those still waiting for rows are told it is gone.
    pub(super) fn remove(&mut self, index: usize, why: &str) -> Result<(), SubsError> {
        let id = self.matchers[index].id.clone();
        self.forget_stored(&id)?;
        let matcher = self.matchers.remove(index);
        let mut waiters = matcher.work.waiting;
        if let Some(Purpose::Ordered(more)) = matcher.work.busy {
            waiters.extend(more);
        }
        for waiter in waiters {
            let _ = waiter.reply.send(Err(SubsError::Unknown(id.clone())));
        }
        tracing::info!(subscription = %id, "subscription removed: {why}");
        Ok(())
    }

    /// Checks and plans `sql` against the current schema; returns the plan, the normalized SQL
    /// and the visible column names.
    pub(super) fn prepare(&mut self, sql: &str) -> Result<(Plan, String, Vec<String>), SubsError> {
        let tables = replicated_tables(&self.reader)?;
        let (mut plan, normalized) = plan(sql, &tables)?;
        // Every table the query reads must be one of its FROM tables (a subquery reading
        // another table would miss that table's changes).
        let read = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
        let recorder = read.clone();
        self.reader
            .authorizer(Some(move |ctx: rusqlite::hooks::AuthContext<'_>| {
                if let rusqlite::hooks::AuthAction::Read { table_name, .. } = ctx.action {
                    if let Ok(mut read) = recorder.lock() {
                        read.insert(table_name.to_lowercase());
                    }
                }
                rusqlite::hooks::Authorization::Allow
            }))?;
        let prepared = self.reader.prepare(&plan.ordered_sql).map(|stmt| {
            (
                stmt.readonly(),
                stmt.column_names().map(str::to_owned).collect::<Vec<_>>(),
            )
        });
        self.reader.authorizer(
            None::<fn(rusqlite::hooks::AuthContext<'_>) -> rusqlite::hooks::Authorization>,
        )?;
        let (readonly, mut columns) =
            prepared.map_err(|e| SubsError::BadQuery(format!("invalid query: {e}")))?;
        if !readonly {
            return Err(SubsError::BadQuery("a subscription must not write".into()));
        }
        let from: BTreeSet<String> = plan.aliases.iter().map(|a| a.table.clone()).collect();
        let read = read
            .lock()
            .map_err(|_| SubsError::Internal("authorizer poisoned".into()))?;
        if let Some(other) = read.iter().find(|t| !from.contains(*t)) {
            return Err(SubsError::BadQuery(format!(
                "the query reads {other} outside its FROM clause (subqueries are not supported)"
            )));
        }
        columns.truncate(columns.len().saturating_sub(plan.key_columns));
        plan.visible = columns.len();
        Ok((plan, normalized, columns))
    }

    /// A new subscription (or a subscriber to the one with the same SQL). A new one's first
    /// rows come from a query thread; `reply` is answered then.
    pub(super) fn subscribe(
        &mut self,
        sql: &str,
        skip_rows: bool,
        from: Option<u64>,
        reply: Reply,
    ) {
        let (plan, normalized, columns) = match self.prepare(sql) {
            Ok(planned) => planned,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let hash = fnv(&normalized);
        if let Some(index) = self.matchers.iter().position(|m| m.hash == hash) {
            if self.matchers[index].columns == columns {
                return self.attach(index, skip_rows, from, reply);
            }
            // The same SQL with other columns now (`SELECT *` after a column was added): the
            // old one cannot go on, and a new one takes its place.
            if let Err(e) = self.remove(index, "its columns changed with the schema") {
                let _ = reply.send(Err(e));
                return;
            }
        }
        if from.is_some() {
            let _ = reply.send(Err(SubsError::BadQuery(
                "from needs an existing subscription (GET /v1/subscriptions/{id})".into(),
            )));
            return;
        }
        // Full, with no subscription to make room: refused before any work.
        if self.matchers.len() >= self.config.max_subscriptions && self.longest_unused().is_none() {
            let _ = reply.send(Err(SubsError::TooMany(self.config.max_subscriptions)));
            return;
        }
        let (live, _) = broadcast::channel(self.config.subscriber_buffer);
        let mut work = Work::new(plan.aliases.len());
        work.waiting.push(Waiter { skip_rows, reply });
        self.matchers.push(Matcher {
            id: random_uuid(),
            hash,
            sql: sql.to_string(),
            by_alias: vec![HashMap::new(); plan.aliases.len()],
            plan,
            columns,
            rows: HashMap::new(),
            next_row_id: 0,
            last_change_id: 0,
            live,
            idle_since: None,
            ready: false,
            work,
        });
        self.note_any();
        let index = self.matchers.len() - 1;
        let matcher = &mut self.matchers[index];
        matcher.work.busy = Some(Purpose::First);
        let job = Job {
            sub: matcher.id.clone(),
            // Its cost is not known yet.
            lane: Lane::Heavy,
            // The whole result to hold (ORDER BY and LIMIT shape only the answer), and the
            // answer, from one snapshot.
            queries: vec![
                Query {
                    sql: matcher.plan.full_sql.clone(),
                    keys: None,
                },
                Query {
                    sql: matcher.plan.ordered_sql.clone(),
                    keys: None,
                },
            ],
            one_snapshot: true,
            visible: matcher.plan.visible,
            key_columns: matcher.plan.key_columns,
        };
        if let Err(e) = self.workers.submit(job) {
            let matcher = self.matchers.remove(index);
            for waiter in matcher.work.waiting {
                let _ = waiter.reply.send(Err(e.clone()));
            }
        }
    }

    /// A subscriber to an existing subscription: answered at once when it resumes from a change
    /// id or skips the rows; otherwise once a query thread has read the rows in order.
    pub(super) fn attach(
        &mut self,
        index: usize,
        skip_rows: bool,
        from: Option<u64>,
        reply: Reply,
    ) {
        let matcher = &mut self.matchers[index];
        if !matcher.ready {
            if from.is_some() {
                let _ = reply.send(Err(SubsError::BadQuery(format!(
                    "subscription {} has no changes yet (its first query is running)",
                    matcher.id
                ))));
            } else {
                matcher.work.waiting.push(Waiter { skip_rows, reply });
            }
            return;
        }
        match from {
            Some(from) => {
                let _ = reply.send(self.replay(index, from));
            }
            None if skip_rows => {
                let _ = reply.send(Ok(self.attached(index, None, false, Vec::new())));
            }
            None => {
                matcher.work.waiting.push(Waiter { skip_rows, reply });
                self.dispatch(index);
            }
        }
    }

    pub(super) fn attached(
        &self,
        index: usize,
        rows: Option<Vec<(u64, Vec<Value>)>>,
        resumed: bool,
        replay: Vec<Arc<ChangeEvent>>,
    ) -> Attached {
        let matcher = &self.matchers[index];
        Attached {
            id: matcher.id.clone(),
            hash: matcher.hash.clone(),
            columns: matcher.columns.clone(),
            rows,
            resumed,
            replay,
            change_id: matcher.last_change_id,
            live: matcher.live.subscribe(),
        }
    }

    /// Sends a subscription's next query, if it has work and none is out.
    pub(super) fn dispatch(&mut self, index: usize) {
        let matcher = &mut self.matchers[index];
        let work = &mut matcher.work;
        if work.busy.is_some() || !matcher.ready {
            return;
        }
        let Some(next) = work.next() else {
            return;
        };
        let (purpose, queries) = if next == Next::Full {
            work.full = false;
            // The whole result covers every changed key.
            work.keys.iter_mut().for_each(BTreeMap::clear);
            let sql = matcher.plan.full_sql.clone();
            (Purpose::Full, vec![Query { sql, keys: None }])
        } else if next == Next::Ordered {
            let sql = matcher.plan.ordered_sql.clone();
            let waiters = std::mem::take(&mut work.waiting);
            (Purpose::Ordered(waiters), vec![Query { sql, keys: None }])
        } else {
            let mut scope = Vec::new();
            let mut queries = Vec::new();
            for (alias, keys) in work.keys.iter_mut().enumerate() {
                if keys.is_empty() {
                    continue;
                }
                let keys = std::mem::take(keys);
                let plan = &matcher.plan.aliases[alias];
                scope.push((alias, keys.keys().cloned().collect()));
                queries.push(Query {
                    sql: plan.restricted_sql.clone(),
                    keys: Some((plan.key_len, keys.into_values().collect())),
                });
            }
            (Purpose::Keys(scope), queries)
        };
        // Whole results and ordered answers may be large whatever the last pass cost.
        let heavy = work.slow || !matches!(purpose, Purpose::Keys(_));
        let job = Job {
            sub: matcher.id.clone(),
            lane: if heavy { Lane::Heavy } else { Lane::Quick },
            queries,
            one_snapshot: false,
            visible: matcher.plan.visible,
            key_columns: matcher.plan.key_columns,
        };
        work.busy = Some(purpose);
        if job.lane == Lane::Quick {
            match self.inline_worker() {
                Ok(worker) => {
                    let done = worker.run(job);
                    return self.on_done_near(done, index);
                }
                Err(e) => {
                    tracing::error!("subscriptions: {e}");
                    self.matchers[index].work.busy = None;
                    self.matchers[index].work.full = true;
                }
            }
            return;
        }
        if let Err(e) = self.workers.submit(job) {
            tracing::error!("subscriptions: {e}");
            if let Some(Purpose::Ordered(waiters)) = self.matchers[index].work.busy.take() {
                for waiter in waiters {
                    let _ = waiter.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// A query thread's answer: applied to its subscription (unless it was removed meanwhile),
    /// whose next query then goes out.
    pub(super) fn on_done(&mut self, done: Done) {
        self.on_done_near(done, usize::MAX);
    }

    /// [`Manager::on_done`] for a subscription last seen at index `hint`.
    pub(super) fn on_done_near(&mut self, done: Done, hint: usize) {
        let Some(index) = self.find(&done.sub, hint) else {
            return;
        };
        let matcher = &mut self.matchers[index];
        matcher.work.slow = done.took > workers::QUICK;
        let Some(purpose) = matcher.work.busy.take() else {
            return;
        };
        let result = match purpose {
            Purpose::First => self.first_rows(index, done.found),
            Purpose::Ordered(waiters) => self.ordered_rows(index, done.found, waiters),
            Purpose::Full => done.found.and_then(|mut found| {
                let found = found.pop().unwrap_or_default();
                self.batch(|manager| {
                    let changes = manager.matchers[index].diff(None, found);
                    manager.emit(index, changes)
                })
            }),
            Purpose::Keys(scopes) => done.found.and_then(|found| {
                // The differences first: most changed keys change nothing in most
                // subscriptions, which then need no storage transaction. (A failure of the
                // transaction below leaves the held rows ahead of the stored ones, and the
                // events of this diff unsent, as a failure of `emit` or COMMIT did before;
                // the whole pass that follows finds nothing more to send for them.)
                let matcher = &mut self.matchers[index];
                let mut changes = Vec::new();
                for ((alias, keys), found) in scopes.into_iter().zip(found) {
                    let mut scope = BTreeSet::new();
                    for key in &keys {
                        if let Some(ids) = matcher.by_alias[alias].get(key) {
                            scope.extend(ids.iter().cloned());
                        }
                    }
                    changes.push(matcher.diff(Some(scope), found));
                }
                if changes.iter().all(Vec::is_empty) {
                    return Ok(());
                }
                self.batch(|manager| {
                    for changes in changes {
                        manager.emit(index, changes)?;
                    }
                    Ok(())
                })
            }),
        };
        match result {
            Err(e @ (SubsError::TooCostly(_) | SubsError::Ended(_))) => {
                // It cannot be kept exact: it ends, and the others go on.
                if let Some(index) = self.find(&done.sub, index) {
                    let why = match e {
                        SubsError::TooCostly(why) => format!("too costly to maintain: {why}"),
                        other => other.to_string(),
                    };
                    if let Err(e) = self.remove(index, &why) {
                        tracing::error!("subscriptions: removing failed: {e}");
                    }
                }
            }
            Err(e) => {
                tracing::error!(subscription = %done.sub, "subscriptions: applying changes failed: {e}");
                // The changes it carried are not lost: the next query reconciles the whole
                // result. Not at once (a lasting failure would spin): with the next change.
                if let Some(index) = self.find(&done.sub, index) {
                    self.matchers[index].work.full = true;
                }
                return;
            }
            Ok(()) => {}
        }
        if let Some(index) = self.find(&done.sub, index) {
            self.dispatch(index);
        }
    }

    /// A new subscription's first rows: the whole result (held, stored) and the rows in the
    /// query's order (the answer), read in one snapshot; then every waiting subscriber is
    /// answered. On failure, or with no room left, it is forgotten and they get the error.
    pub(super) fn first_rows(
        &mut self,
        index: usize,
        found: Result<Vec<FoundRows>, SubsError>,
    ) -> Result<(), SubsError> {
        let id = self.matchers[index].id.clone();
        let fail = |manager: &mut Manager, e: SubsError| {
            if let Some(index) = manager.position(&id) {
                let matcher = manager.matchers.remove(index);
                for waiter in matcher.work.waiting {
                    let _ = waiter.reply.send(Err(e.clone()));
                }
            }
        };
        let (whole, ordered) = match found {
            Ok(mut found) if found.len() == 2 => {
                let ordered = found.pop().unwrap_or_default();
                (found.pop().unwrap_or_default(), ordered)
            }
            Ok(_) => {
                fail(
                    self,
                    SubsError::Internal("a first query answered wrongly".into()),
                );
                return Ok(());
            }
            Err(e) => {
                fail(self, e);
                return Ok(());
            }
        };
        // Only now, with the new one known to work, an unused one makes room; with none to
        // spare (others were added meanwhile), the new one is refused.
        if self.matchers.len() > self.config.max_subscriptions {
            match self.longest_unused().filter(|&i| i != index) {
                Some(unused) => {
                    if let Err(e) = self.remove(unused, "room for a new subscription") {
                        tracing::warn!("subscriptions: making room failed: {e}");
                    }
                }
                None => {
                    fail(self, SubsError::TooMany(self.config.max_subscriptions));
                    return Ok(());
                }
            }
        }
        let Some(index) = self.position(&id) else {
            return Ok(());
        };
        // The whole result is the starting point, not changes.
        let _ = self.matchers[index].diff(None, whole);
        if let Err(e) = self.store_new(index) {
            fail(self, e);
            return Ok(());
        }
        let matcher = &mut self.matchers[index];
        matcher.ready = true;
        let rows: Vec<(u64, Vec<Value>)> = ordered
            .into_iter()
            .filter_map(|(identity, values)| {
                matcher
                    .rows
                    .get(&identity)
                    .map(|(row_id, _)| (*row_id, values))
            })
            .collect();
        for waiter in std::mem::take(&mut matcher.work.waiting) {
            let rows = (!waiter.skip_rows).then(|| rows.clone());
            let _ = waiter
                .reply
                .send(Ok(self.attached(index, rows, false, Vec::new())));
        }
        Ok(())
    }

    /// The rows in the query's order for subscribers attaching: any difference from the held
    /// rows (a commit not yet announced) becomes events first, so the rows agree with the
    /// stream. An error goes to the waiters, and ends the subscription only when it cannot go
    /// on (its columns changed).
    pub(super) fn ordered_rows(
        &mut self,
        index: usize,
        found: Result<Vec<FoundRows>, SubsError>,
        waiters: Vec<Waiter>,
    ) -> Result<(), SubsError> {
        let result = found.and_then(|mut found| {
            let found = found.pop().unwrap_or_default();
            let mut stale = Vec::new();
            for (identity, values) in &found {
                if self.matchers[index].rows.get(identity).map(|(_, v)| v) != Some(values) {
                    stale.push((identity.clone(), values.clone()));
                }
            }
            if !stale.is_empty() {
                let scope: BTreeSet<Vec<u8>> = stale.iter().map(|(i, _)| i.clone()).collect();
                self.batch(|manager| {
                    let changes = manager.matchers[index].diff(Some(scope), stale);
                    manager.emit(index, changes)
                })?;
            }
            let matcher = &self.matchers[index];
            Ok(found
                .into_iter()
                .filter_map(|(identity, values)| {
                    matcher.rows.get(&identity).map(|(id, _)| (*id, values))
                })
                .collect::<Vec<_>>())
        });
        for waiter in waiters {
            let _ = waiter.reply.send(match &result {
                Ok(rows) => Ok(self.attached(index, Some(rows.clone()), false, Vec::new())),
                Err(e) => Err(e.clone()),
            });
        }
        match result {
            Err(e @ SubsError::Ended(_)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Runs `body` in one storage transaction; the events it emitted are sent to subscribers
    /// only once that transaction committed (durable before visible).
    pub(super) fn batch(
        &mut self,
        body: impl FnOnce(&mut Manager) -> Result<(), SubsError>,
    ) -> Result<(), SubsError> {
        self.storage.execute_batch("BEGIN")?;
        match body(self) {
            Ok(()) => {
                if let Err(e) = self.storage.execute_batch("COMMIT") {
                    // Not left open (every later BEGIN would fail), and its events never
                    // sent: a later batch would send them, perhaps to subscriptions that
                    // have moved to other indices since.
                    let _ = self.storage.execute_batch("ROLLBACK");
                    self.pending.clear();
                    return Err(e.into());
                }
                for (index, events) in std::mem::take(&mut self.pending) {
                    for event in events {
                        // No subscriber attached is fine: the history keeps it.
                        let _ = self.matchers[index].live.send(event);
                    }
                }
                Ok(())
            }
            Err(e) => {
                let _ = self.storage.execute_batch("ROLLBACK");
                self.pending.clear();
                Err(e)
            }
        }
    }

    /// Numbers the changes and stores them (rows, history, trimmed) inside the open
    /// transaction of [`Manager::batch`], which sends them.
    pub(super) fn emit(
        &mut self,
        index: usize,
        changes: Vec<(ChangeType, u64, Vec<Value>, Vec<u8>)>,
    ) -> Result<(), SubsError> {
        if changes.is_empty() {
            return Ok(());
        }
        let history_len = self.config.history_len;
        let matcher = &mut self.matchers[index];
        let mut events = Vec::with_capacity(changes.len());
        let db = &self.storage;
        let mut upsert = db.prepare_cached(
            "INSERT OR REPLACE INTO sub_rows (sub, identity, row_id, vals) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut delete =
            db.prepare_cached("DELETE FROM sub_rows WHERE sub = ?1 AND identity = ?2")?;
        let mut record = db.prepare_cached(
            "INSERT INTO sub_changes (sub, change_id, kind, row_id, vals) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for (kind, row_id, values, identity) in changes {
            matcher.last_change_id += 1;
            let packed = encode_row(&values);
            if kind == ChangeType::Delete {
                delete.execute(params![matcher.id, identity])?;
            } else {
                upsert.execute(params![matcher.id, identity, row_id as i64, packed])?;
            }
            record.execute(params![
                matcher.id,
                matcher.last_change_id as i64,
                kind_code(kind),
                row_id as i64,
                packed
            ])?;
            events.push(Arc::new(ChangeEvent {
                kind,
                row_id,
                values,
                change_id: matcher.last_change_id,
            }));
        }
        db.prepare_cached("DELETE FROM sub_changes WHERE sub = ?1 AND change_id <= ?2")?
            .execute(params![
                matcher.id,
                matcher.last_change_id.saturating_sub(history_len) as i64
            ])?;
        db.prepare_cached("UPDATE subs SET last_change_id = ?2, next_row_id = ?3 WHERE id = ?1")?
            .execute(params![
                matcher.id,
                matcher.last_change_id as i64,
                matcher.next_row_id as i64
            ])?;
        self.pending.push((index, events));
        Ok(())
    }

    /// Records the changed keys for every subscription reading their tables, and sends the
    /// queries of those with none out.
    pub(super) fn on_changes(&mut self, batches: &[Arc<Vec<RowChange>>]) {
        // Changed keys per table, deduplicated across the batches.
        let mut changed: BTreeMap<String, BTreeMap<Vec<u8>, Vec<Value>>> = BTreeMap::new();
        for batch in batches {
            for row in batch.iter() {
                changed
                    .entry(row.table.to_lowercase())
                    .or_default()
                    .insert(row.pk.as_bytes().to_vec(), row.pk.values());
            }
        }
        let mut touched: Vec<(usize, String)> = Vec::new();
        let keys_max = self.config.rows_max.max(1);
        for (index, matcher) in self.matchers.iter_mut().enumerate() {
            let mut reads = false;
            for (alias, plan) in matcher.plan.aliases.iter().enumerate() {
                let Some(keys) = changed.get(&plan.table) else {
                    continue;
                };
                reads = true;
                let work = &mut matcher.work;
                if work.full {
                    // The whole result, next, covers these keys too.
                    continue;
                }
                let pending = &mut work.keys[alias];
                pending.extend(keys.iter().map(|(k, v)| (k.clone(), v.clone())));
                if pending.len() > keys_max {
                    // More changed keys than rows a subscription may hold (a bulk write):
                    // one pass over the whole result, on the heavy thread, instead of
                    // putting them all in the key table on the subscription thread; and
                    // the list no longer grows while a query is out.
                    work.full = true;
                    work.keys.iter_mut().for_each(BTreeMap::clear);
                }
            }
            if reads {
                touched.push((index, matcher.id.clone()));
            }
        }
        // By id: a quick query runs at once and may end its subscription (indices shift). Last
        // first, so that an end shifts only the ones already sent and each is found at its
        // index.
        for (index, id) in touched.into_iter().rev() {
            if let Some(index) = self.find(&id, index) {
                self.dispatch(index);
            }
        }
    }

    /// Compares every subscription with the whole data and emits the difference.
    pub(super) fn resync(&mut self) {
        let ids: Vec<String> = self.matchers.iter().map(|m| m.id.clone()).collect();
        for id in ids {
            if let Some(index) = self.position(&id) {
                self.matchers[index].work.full = true;
                self.dispatch(index);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter() -> Waiter {
        Waiter {
            skip_rows: false,
            reply: oneshot::channel().0,
        }
    }

    /// A whole pass owed goes first, then waiting subscribers, then changed keys; but when a
    /// bulk write owes another whole pass while one runs, the waiting subscribers go first.
    #[test]
    fn waiting_subscribers_go_between_whole_passes() {
        let mut work = Work::new(1);
        assert_eq!(work.next(), None);
        work.keys[0].insert(vec![1], vec![Value::Integer(1)]);
        work.waiting.push(waiter());
        work.full = true;
        assert_eq!(work.next(), Some(Next::Full));
        work.full = false;
        // A bulk write during it owes another.
        work.full = true;
        assert_eq!(
            work.next(),
            Some(Next::Ordered),
            "not a second whole pass first"
        );
        work.waiting.clear();
        work.waiting.push(waiter());
        assert_eq!(work.next(), Some(Next::Full));
        work.full = false;
        assert_eq!(work.next(), Some(Next::Ordered));
        work.waiting.clear();
        assert_eq!(work.next(), Some(Next::Keys));
        work.keys[0].clear();
        assert_eq!(work.next(), None);
    }
}
