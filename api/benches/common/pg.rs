//! PostgreSQL schemas of their own for the benches that run on `TENANTRY_BENCH_DATABASE_URL`.

/// The bench's PostgreSQL database: a connection for making and dropping schemas.
pub struct Schemas {
    base: String,
    conn: sqlx::AnyConnection,
    made: Vec<String>,
}

impl Schemas {
    /// Connects to `TENANTRY_BENCH_DATABASE_URL`; `None` when it is unset.
    pub async fn connect() -> Option<Schemas> {
        let base = std::env::var("TENANTRY_BENCH_DATABASE_URL").ok()?;
        let (conn, _) = tenantry_api::store::backup::connect(&base, false)
            .await
            .unwrap();
        Some(Schemas {
            base,
            conn,
            made: Vec::new(),
        })
    }

    /// A new empty schema `<prefix>_<pid>`, and the URL that works in it.
    pub async fn fresh(&mut self, prefix: &str) -> String {
        let schema = format!("{prefix}_{}", std::process::id());
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        )))
        .execute(&mut self.conn)
        .await
        .unwrap();
        let sep = if self.base.contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}options=-c%20search_path%3D{schema}", self.base);
        self.made.push(schema);
        url
    }

    /// Drops every schema [`Schemas::fresh`] made.
    pub async fn drop_all(mut self) {
        for schema in std::mem::take(&mut self.made) {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .execute(&mut self.conn)
                .await
                .unwrap();
        }
    }
}
