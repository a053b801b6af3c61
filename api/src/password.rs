//! Password hashing (argon2id) and the password policy.
//!
//! Hashes are PHC strings, so each records its own parameters: verification uses the
//! stored parameters, and [`PasswordHasher::needs_rehash`] tells the login path to store a
//! new hash when the configured parameters have risen since.
//!
//! Argon2's working memory (19 MiB by default) is kept between hashes in a small pool
//! rather than allocated for each: a fresh allocation of that size is a new mapping whose
//! every page the kernel faults in and clears, which cost the server a quarter or more of
//! the hash's own time (measured with `perf`; see docs/operations.md).

use std::sync::{Arc, Mutex};

use argon2::password_hash::phc::{Output, ParamsString, Salt};
use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use secrecy::{ExposeSecret, SecretString};

use crate::crypto::{ct_eq, random_bytes};
use crate::error::Error;

/// Shortest accepted password, in characters.
pub const MIN_LEN: usize = 12;
/// Longest accepted password, in characters (bounds the hashing cost of a request).
pub const MAX_LEN: usize = 256;

/// Runs password hashes on threads of its own, one per core, in the order they were asked
/// for: a thread that finishes a hash takes the next waiting one itself, with no hand-off
/// through the async runtime. The argon2 bound of `benches/throughput.rs` runs on this same
/// pool, so the server is compared with its own hashing code.
#[derive(Debug)]
pub struct HashingPool {
    jobs: std::sync::mpsc::Sender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

impl HashingPool {
    /// A pool of `threads` threads (named `argon2-N`); they end when the pool is dropped.
    pub fn new(threads: usize) -> Result<Self, Error> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    loop {
                        let next = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = next else { return };
                        // A panicking job loses its own answer (its caller hears that the
                        // pool closed), not the thread.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                })
                .map_err(|e| Error::Config(format!("cannot start a hashing thread: {e}")))?;
        }
        Ok(HashingPool { jobs })
    }

    /// Runs `f` on the pool and waits for it.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = done.send(f());
            }))
            .map_err(|_| Error::Crypto("hashing pool closed"))?;
        answer
            .await
            .map_err(|_| Error::Crypto("a password hash failed"))
    }
}

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashParams {
    /// Memory in KiB (OWASP minimum: 19 MiB = 19,456 KiB).
    pub memory_kib: u32,
    /// Iterations (OWASP minimum with 19 MiB: 2).
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for HashParams {
    fn default() -> Self {
        HashParams {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
        }
    }
}

/// Hashes and verifies passwords with one set of parameters.
#[derive(Clone)]
pub struct PasswordHasher {
    params: Params,
    /// A hash of a random password, verified against when an email is unknown so that
    /// unknown emails cost the same time as wrong passwords.
    dummy_hash: String,
    /// Working memory of `params`' size, reused by later hashes.
    memory: Arc<MemoryPool>,
}

/// Argon2 working memory of one size, kept for reuse: at most one buffer per core (the
/// server runs at most that many hashes at once), so it holds what the busiest moment
/// needed and no more. A buffer holds the intermediate state of the last hash made in it;
/// it stays in this pool, never handed to other code, and the next hash overwrites it.
struct MemoryPool {
    blocks: usize,
    keep: usize,
    free: Mutex<Vec<Box<[Block]>>>,
}

impl MemoryPool {
    fn new(blocks: usize) -> Self {
        MemoryPool {
            blocks,
            keep: std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            free: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` with `blocks` blocks of memory: a pooled buffer when the size is this
    /// pool's, otherwise (a stored hash of other parameters) a buffer of its own.
    fn with<T>(&self, blocks: usize, f: impl FnOnce(&mut [Block]) -> T) -> T {
        let fresh = || vec![Block::default(); blocks].into_boxed_slice();
        if blocks != self.blocks {
            return f(&mut fresh());
        }
        let pooled = self.free.lock().ok().and_then(|mut free| free.pop());
        let mut memory = pooled.unwrap_or_else(fresh);
        let out = f(&mut memory);
        if let Ok(mut free) = self.free.lock()
            && free.len() < self.keep
        {
            free.push(memory);
        }
        out
    }
}

impl std::fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordHasher")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl PasswordHasher {
    /// A hasher with these parameters; refuses parameters argon2 cannot use.
    pub fn new(p: HashParams) -> Result<Self, Error> {
        let params = Params::new(p.memory_kib, p.iterations, p.parallelism, None)
            .map_err(|e| Error::Config(format!("invalid argon2 parameters: {e}")))?;
        let memory = Arc::new(MemoryPool::new(params.block_count()));
        let mut hasher = PasswordHasher {
            params,
            dummy_hash: String::new(),
            memory,
        };
        let random = hex::encode(random_bytes::<16>()?);
        hasher.dummy_hash = hasher.hash(&SecretString::from(random))?;
        Ok(hasher)
    }

    /// The raw argon2 output of `password` with `salt` and `params`, in pooled memory.
    fn compute(
        &self,
        password: &SecretString,
        salt: &[u8],
        algorithm: Algorithm,
        version: Version,
        params: Params,
    ) -> Result<Output, Error> {
        let len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        let blocks = params.block_count();
        let argon2 = Argon2::new(algorithm, version, params);
        let mut buffer = [0u8; Output::MAX_LENGTH];
        let out = buffer
            .get_mut(..len)
            .ok_or_else(|| Error::Hashing("output length".into()))?;
        self.memory
            .with(blocks, |memory| {
                argon2.hash_password_into_with_memory(
                    password.expose_secret().as_bytes(),
                    salt,
                    out,
                    memory,
                )
            })
            .map_err(|e| Error::Hashing(e.to_string()))?;
        Output::new(out).map_err(|e| Error::Hashing(e.to_string()))
    }

    /// A PHC string (`$argon2id$v=19$m=...`) with a fresh 128-bit salt.
    pub fn hash(&self, password: &SecretString) -> Result<String, Error> {
        let salt = random_bytes::<16>()?;
        let hash = self.compute(
            password,
            &salt,
            Algorithm::Argon2id,
            Version::V0x13,
            self.params.clone(),
        )?;
        let phc = PasswordHash {
            algorithm: argon2::ARGON2ID_IDENT,
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&self.params)
                .map_err(|e| Error::Hashing(e.to_string()))?,
            salt: Some(Salt::new(&salt).map_err(|e| Error::Hashing(e.to_string()))?),
            hash: Some(hash),
        };
        Ok(phc.to_string())
    }

    /// True when `password` matches `stored`. The comparison is constant-time; a malformed
    /// stored hash is an error, not a mismatch.
    pub fn verify(&self, password: &SecretString, stored: &str) -> Result<bool, Error> {
        let parsed =
            PasswordHash::new(stored).map_err(|e| Error::Hashing(format!("stored hash: {e}")))?;
        let algorithm = Algorithm::try_from(parsed.algorithm.as_str())
            .map_err(|e| Error::Hashing(format!("stored hash: {e}")))?;
        let params =
            Params::try_from(&parsed).map_err(|e| Error::Hashing(format!("stored hash: {e}")))?;
        let version = parsed
            .version
            .map(Version::try_from)
            .transpose()
            .map_err(|e| Error::Hashing(format!("stored hash: {e}")))?
            .unwrap_or_default();
        let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
            return Err(Error::Hashing("stored hash has no salt or output".into()));
        };
        let computed = self.compute(password, salt.as_ref(), algorithm, version, params)?;
        Ok(ct_eq(computed.as_ref(), expected.as_ref()))
    }

    /// Burns the same time as [`PasswordHasher::verify`] for an unknown account.
    pub fn verify_dummy(&self, password: &SecretString) -> Result<(), Error> {
        self.verify(password, &self.dummy_hash).map(|_| ())
    }

    /// True when `stored` was made with weaker parameters than this hasher's (or another
    /// algorithm), so the login path should store a new hash.
    pub fn needs_rehash(&self, stored: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(stored) else {
            return true;
        };
        if parsed.algorithm.as_str() != "argon2id" {
            return true;
        }
        match Params::try_from(&parsed) {
            Ok(p) => {
                p.m_cost() < self.params.m_cost()
                    || p.t_cost() < self.params.t_cost()
                    || p.p_cost() < self.params.p_cost()
            }
            Err(_) => true,
        }
    }
}

/// Passwords that are long enough but far too common (from public breach corpora).
const COMMON: &[&str] = &[
    "123456789012",
    "1234567890123",
    "12345678901234",
    "123456789123",
    "qwertyuiop123",
    "qwertyuiopas",
    "qwertyuiopasdf",
    "qwertyuiopasdfgh",
    "1qaz2wsx3edc",
    "1q2w3e4r5t6y",
    "1q2w3e4r5t6y7u",
    "zaq12wsxcde3",
    "passwordpassword",
    "password1234",
    "password12345",
    "password123456",
    "password1234!",
    "p@ssw0rd1234",
    "passw0rd1234",
    "iloveyou1234",
    "letmein12345",
    "letmeinplease",
    "welcome12345",
    "welcome123456",
    "administrator",
    "administrator1",
    "changeme1234",
    "changemeplease",
    "trustno11234",
    "football1234",
    "baseball1234",
    "superman1234",
    "sunshine1234",
    "princess1234",
    "starwars1234",
    "monkey123456",
    "dragon123456",
    "abc123456789",
    "abcdefghijkl",
    "abcdefghijklm",
    "aaaaaaaaaaaa",
    "111111111111",
    "000000000000",
    "123123123123",
    "123412341234",
    "qazwsxedcrfv",
    "asdfghjkl123",
    "zxcvbnm12345",
    "mypassword123",
    "secretpassword",
    "thisismypassword",
    "correcthorsebatterystaple",
    "iloveyouforever",
    "whatever1234",
    "michael12345",
    "jennifer1234",
    "computer1234",
    "internet1234",
    "samsung12345",
    "liverpool1234",
    "chocolate123",
    "butterfly123",
    "qwerty123456",
    "qwerty1234567",
    "1234qwerasdf",
    "asdf1234asdf",
    "q1w2e3r4t5y6",
    "a1b2c3d4e5f6",
    "password!234",
];

/// Why a password is refused; the message is safe to show and never contains the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordPolicyError {
    /// Fewer than [`MIN_LEN`] characters.
    #[error("password must be at least {MIN_LEN} characters")]
    TooShort,
    /// More than [`MAX_LEN`] characters.
    #[error("password must be at most {MAX_LEN} characters")]
    TooLong,
    /// On the list of common passwords.
    #[error("password is too common")]
    Common,
    /// Contains the email's local part or the tenant name.
    #[error("password must not contain your email or tenant name")]
    ContainsIdentity,
    /// A repeated character, a keyboard or alphabet run, or too few distinct characters.
    #[error("password is too easy to guess (repeated or sequential characters)")]
    Guessable,
}

/// Checks a new password. `identity` holds strings the password must not contain (the
/// email's local part, the tenant name); entries shorter than 4 characters are ignored.
pub fn check_policy(password: &SecretString, identity: &[&str]) -> Result<(), PasswordPolicyError> {
    let pw = password.expose_secret();
    let len = pw.chars().count();
    if len < MIN_LEN {
        return Err(PasswordPolicyError::TooShort);
    }
    if len > MAX_LEN {
        return Err(PasswordPolicyError::TooLong);
    }
    let lower = pw.to_lowercase();
    if COMMON.contains(&lower.as_str()) {
        return Err(PasswordPolicyError::Common);
    }
    for id in identity {
        let id = id.trim().to_lowercase();
        if id.chars().count() >= 4 && lower.contains(&id) {
            return Err(PasswordPolicyError::ContainsIdentity);
        }
    }
    if is_guessable(&lower) {
        return Err(PasswordPolicyError::Guessable);
    }
    Ok(())
}

/// Few distinct characters, or mostly made of one short repeated pattern or of
/// ascending/descending runs.
fn is_guessable(lower: &str) -> bool {
    let chars: Vec<char> = lower.chars().collect();
    let mut distinct = chars.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() < 5 {
        return true;
    }
    // A pattern of up to 4 characters repeated across the whole password.
    for period in 1..=4 {
        if chars.len() >= period * 3
            && chars
                .iter()
                .enumerate()
                .all(|(i, c)| *c == chars[i % period])
        {
            return true;
        }
    }
    // Mostly sequential: count steps of +1 or -1 between neighbours (abc…, 987…).
    let steps = chars
        .windows(2)
        .filter(|w| {
            let d = i64::from(u32::from(w[1])) - i64::from(u32::from(w[0]));
            d == 1 || d == -1
        })
        .count();
    steps * 4 >= (chars.len() - 1) * 3
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn cheap() -> PasswordHasher {
        PasswordHasher::new(HashParams {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap()
    }

    fn s(v: &str) -> SecretString {
        SecretString::from(v.to_owned())
    }

    #[test]
    fn hash_verifies_only_the_right_password() {
        let h = cheap();
        let stored = h.hash(&s("correct horse battery")).unwrap();
        assert!(stored.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"));
        assert!(h.verify(&s("correct horse battery"), &stored).unwrap());
        assert!(!h.verify(&s("correct horse batterz"), &stored).unwrap());
        assert!(h.verify(&s("x"), "not a phc string").is_err());
        h.verify_dummy(&s("anything at all")).unwrap();
    }

    #[test]
    fn pooled_memory_gives_argon2s_own_hashes() {
        use argon2::{PasswordHasher as _, PasswordVerifier as _};
        let h = cheap();
        // Leave the pool's memory dirty with other hashes first.
        for i in 0..3 {
            h.hash(&s(&format!("a warm-up password {i}"))).unwrap();
        }
        let params = Params::new(1024, 1, 1, None).unwrap();
        for algorithm in [Algorithm::Argon2id, Algorithm::Argon2i, Algorithm::Argon2d] {
            for version in [Version::V0x13, Version::V0x10] {
                let reference = Argon2::new(algorithm, version, params.clone())
                    .hash_password_with_salt(b"correct horse battery", b"sixteen byte slt")
                    .unwrap()
                    .to_string();
                assert!(h.verify(&s("correct horse battery"), &reference).unwrap());
                assert!(!h.verify(&s("correct horse batterz"), &reference).unwrap());
            }
        }
        // Other parameters than the pool's (an older, weaker hash) use memory of their own.
        let older = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(512, 2, 1, None).unwrap(),
        )
        .hash_password_with_salt(b"correct horse battery", b"sixteen byte slt")
        .unwrap()
        .to_string();
        assert!(h.verify(&s("correct horse battery"), &older).unwrap());
        // And argon2's own verifier accepts what the pool made.
        let ours = h.hash(&s("correct horse battery")).unwrap();
        Argon2::default()
            .verify_password(b"correct horse battery", ours.as_str())
            .unwrap();
    }

    #[tokio::test]
    async fn the_hashing_pool_answers_every_job_and_survives_a_panic() {
        let pool = Arc::new(HashingPool::new(2).unwrap());
        let h = Arc::new(cheap());
        let mut jobs = Vec::new();
        for i in 0..16 {
            let (pool, h) = (Arc::clone(&pool), Arc::clone(&h));
            jobs.push(tokio::spawn(async move {
                let pw = s(&format!("password number {i}"));
                let stored = pool.run({
                    let (h, pw) = (Arc::clone(&h), pw.clone());
                    move || h.hash(&pw)
                });
                let stored = stored.await.unwrap().unwrap();
                pool.run(move || h.verify(&pw, &stored))
                    .await
                    .unwrap()
                    .unwrap()
            }));
        }
        for job in jobs {
            assert!(job.await.unwrap());
        }
        #[allow(clippy::panic)]
        let failed = pool.run(|| -> u8 { panic!("a job that panics") }).await;
        assert!(matches!(failed, Err(Error::Crypto(_))), "{failed:?}");
        // Both threads are still there.
        let (a, b) = tokio::join!(pool.run(|| 1), pool.run(|| 2));
        assert_eq!((a.unwrap(), b.unwrap()), (1, 2));
    }

    #[test]
    fn default_parameters_meet_owasp() {
        let p = HashParams::default();
        assert!(p.memory_kib >= 19_456 && p.iterations >= 2 && p.parallelism >= 1);
    }

    #[test]
    fn rehash_is_needed_when_parameters_rise() {
        let weak = cheap();
        let stored = weak.hash(&s("correct horse battery")).unwrap();
        let strong = PasswordHasher::new(HashParams {
            memory_kib: 2048,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap();
        assert!(strong.needs_rehash(&stored));
        assert!(!weak.needs_rehash(&stored));
        // The stronger hasher still verifies the old hash with its own parameters.
        assert!(strong.verify(&s("correct horse battery"), &stored).unwrap());
        assert!(strong.needs_rehash("$2b$12$bcrypt-style-hash"));
    }

    #[test]
    fn policy_enforces_length() {
        assert_eq!(
            check_policy(&s("short1!"), &[]),
            Err(PasswordPolicyError::TooShort)
        );
        assert_eq!(
            check_policy(&s(&"ab1!".repeat(65)), &[]),
            Err(PasswordPolicyError::TooLong)
        );
        // Characters, not bytes: 12 multi-byte characters are enough.
        assert!(check_policy(&s("ünïcødé-pässwörd"), &[]).is_ok());
        assert!(check_policy(&s(&"x1y2z3w4".repeat(32)), &[]).is_ok());
    }

    #[test]
    fn policy_refuses_common_and_guessable() {
        assert_eq!(
            check_policy(&s("Password1234"), &[]),
            Err(PasswordPolicyError::Common)
        );
        assert_eq!(
            check_policy(&s("zzzzzzzzzzzzzz"), &[]),
            Err(PasswordPolicyError::Guessable)
        );
        assert_eq!(
            check_policy(&s("abababababab"), &[]),
            Err(PasswordPolicyError::Guessable)
        );
        assert_eq!(
            check_policy(&s("mnopqrstuvwxyz"), &[]),
            Err(PasswordPolicyError::Guessable)
        );
        assert_eq!(
            check_policy(&s("98765432109876"), &[]),
            Err(PasswordPolicyError::Guessable)
        );
        assert!(check_policy(&s("tr0ub4dor&3-horse"), &[]).is_ok());
    }

    #[test]
    fn policy_refuses_identity() {
        assert_eq!(
            check_policy(&s("alice-is-great-42"), &["alice", "acme"]),
            Err(PasswordPolicyError::ContainsIdentity)
        );
        assert!(check_policy(&s("bob-is-great-42!"), &["alice", "acme"]).is_ok());
    }

    #[test]
    fn policy_errors_never_echo_the_password() {
        let err = check_policy(&s("hunter2"), &[]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }
}
