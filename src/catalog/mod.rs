//! Durable definitions of named relations (tables today; topics, sources,
//! views and sinks as they arrive) and name resolution.
//!
//! The catalog is a small JSON document replaced atomically (write a temp
//! file, fsync, rename, fsync the directory), so a crash leaves either the old
//! or the new version, never a mix. It stores each relation's defining SQL and
//! lets the engine re-plan it on start; it must never hold rows.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::types::{SqlState, WeirError, WeirResult};

const CATALOG_FILE: &str = "catalog.json";

/// What kind of relation a catalog entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelationKind {
    Table,
    Topic,
    Subscription,
    Source,
    MaterializedView,
    Sink,
}

impl RelationKind {
    /// The noun used in messages ("table \"t\" does not exist").
    pub fn noun(&self) -> &'static str {
        match self {
            RelationKind::Table => "table",
            RelationKind::Topic => "topic",
            RelationKind::Subscription => "subscription",
            RelationKind::Source => "source",
            RelationKind::MaterializedView => "materialized view",
            RelationKind::Sink => "sink",
        }
    }
}

/// One durable definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Relation {
    /// Never reused, so a dropped and re-created name gets fresh storage.
    pub id: u64,
    /// Normalised (unquoted identifiers lowercased) name in schema `public`.
    pub name: String,
    pub kind: RelationKind,
    /// The statement that defines it, re-planned on start.
    pub sql: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CatalogData {
    next_id: u64,
    relations: BTreeMap<String, Relation>,
}

/// The durable catalog. Cheap reads; writes persist before returning.
#[derive(Debug)]
pub struct Catalog {
    dir: PathBuf,
    /// Held only for in-memory updates and the synchronous file replace; never
    /// across an `.await`.
    data: Mutex<CatalogData>,
}

impl Catalog {
    /// Opens the catalog in `dir`, or starts an empty one.
    pub fn open(dir: &Path) -> WeirResult<Catalog> {
        let path = dir.join(CATALOG_FILE);
        let data = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                WeirError::new(
                    SqlState::DATA_CORRUPTED,
                    format!("catalog file {} is unreadable: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CatalogData::default(),
            Err(e) => return Err(WeirError::io(format!("reading {}", path.display()), e)),
        };
        Ok(Catalog {
            dir: dir.to_path_buf(),
            data: Mutex::new(data),
        })
    }

    pub fn get(&self, name: &str) -> Option<Relation> {
        self.lock().relations.get(name).cloned()
    }

    pub fn relations(&self) -> Vec<Relation> {
        self.lock().relations.values().cloned().collect()
    }

    /// Adds a relation and persists the catalog. 42P07 if the name is taken.
    pub fn create(&self, name: &str, kind: RelationKind, sql: String) -> WeirResult<Relation> {
        let mut data = self.lock();
        if let Some(existing) = data.relations.get(name) {
            return Err(WeirError::new(
                SqlState::DUPLICATE_TABLE,
                format!("relation \"{name}\" already exists"),
            )
            .with_detail(format!("\"{name}\" is a {}", existing.kind.noun()))
            .with_hint("choose another name, or use IF NOT EXISTS"));
        }
        data.next_id += 1;
        let relation = Relation {
            id: data.next_id,
            name: name.to_string(),
            kind,
            sql,
        };
        data.relations.insert(name.to_string(), relation.clone());
        if let Err(e) = self.persist(&data) {
            data.relations.remove(name);
            return Err(e);
        }
        Ok(relation)
    }

    /// Removes a relation and persists the catalog. Returns it, or `None` if absent.
    pub fn drop_relation(&self, name: &str) -> WeirResult<Option<Relation>> {
        let mut data = self.lock();
        let Some(removed) = data.relations.remove(name) else {
            return Ok(None);
        };
        if let Err(e) = self.persist(&data) {
            data.relations.insert(name.to_string(), removed);
            return Err(e);
        }
        Ok(Some(removed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CatalogData> {
        // A poisoned lock means a panic mid-update of plain data; the data
        // itself is still consistent because persist() runs before mutation
        // is considered done, so keep going.
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, data: &CatalogData) -> WeirResult<()> {
        let path = self.dir.join(CATALOG_FILE);
        let tmp = self.dir.join(format!("{CATALOG_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(data)
            .map_err(|e| WeirError::internal(format!("serialising catalog: {e}")))?;
        let io = |e: std::io::Error| WeirError::io(format!("writing {}", path.display()), e);
        let mut file = fs::File::create(&tmp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}
