//! Whose address a call comes from, when a proxy (the signup portal, an ingress) sits in
//! front of the API: the proxy sends the person's address in `x-forwarded-for`, and the
//! API believes it only when the connection comes from a `--trusted-proxies` CIDR (none by
//! default). Anyone else could write any address there, so for them the header is
//! ignored. The per-source rate limit and the audit log use the address resolved here
//! ([`ClientAddr`], read by [`crate::auth::source_of`]).

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The header (gRPC metadata) a trusted proxy puts the client's address in.
pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// A network in CIDR notation (`10.0.0.0/8`, `fd00::/8`; a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let bad = || format!("{text:?} is not an address or CIDR such as 10.0.0.0/8 or fd00::/8");
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text.trim(), None),
        };
        let network = IpAddr::from_str(addr).map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        if mask(network, prefix) != network {
            return Err(format!(
                "{text:?} has host bits set; write the network address (e.g. {}/{prefix})",
                mask(network, prefix)
            ));
        }
        Ok(Cidr { network, prefix })
    }
}

/// `addr` with all but its first `prefix` bits cleared.
fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let keep = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((bits & keep).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let keep = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((bits & keep).into())
        }
    }
}

impl Cidr {
    /// Whether `addr` is in this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        addr.is_ipv4() == self.network.is_ipv4() && mask(addr, self.prefix) == self.network
    }
}

/// The proxies whose `x-forwarded-for` the API believes.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Arc<[Cidr]>);

impl TrustedProxies {
    /// Trust the proxies in `cidrs`.
    pub fn new(cidrs: Vec<Cidr>) -> TrustedProxies {
        TrustedProxies(cidrs.into())
    }

    fn trusts(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(addr))
    }

    /// The client's address for a connection from `peer` carrying `forwarded` (the
    /// `x-forwarded-for` values in order). From the right, every hop that is a trusted
    /// proxy passes the address on its left along; the first hop that is not trusted is
    /// the client. A value that is not an address stops the walk at the hop that sent it.
    pub fn client(&self, peer: IpAddr, forwarded: &[&str]) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.trusts(client) {
            return client;
        }
        let hops = forwarded
            .iter()
            .rev()
            .flat_map(|v| v.rsplit(','))
            .map(str::trim);
        for hop in hops {
            match IpAddr::from_str(hop) {
                Ok(addr) => {
                    client = addr.to_canonical();
                    if !self.trusts(client) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        client
    }
}

/// The caller's address as resolved by [`ForwardedLayer`]: a request extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// A tower layer putting [`ClientAddr`] on every request.
#[derive(Debug, Clone)]
pub struct ForwardedLayer {
    trusted: TrustedProxies,
}

impl ForwardedLayer {
    /// A layer believing `x-forwarded-for` from `trusted` only.
    pub fn new(trusted: TrustedProxies) -> ForwardedLayer {
        ForwardedLayer { trusted }
    }
}

impl<S> tower_layer::Layer<S> for ForwardedLayer {
    type Service = ForwardedService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ForwardedService {
            inner,
            trusted: self.trusted.clone(),
        }
    }
}

/// The service [`ForwardedLayer`] makes.
#[derive(Debug, Clone)]
pub struct ForwardedService<S> {
    inner: S,
    trusted: TrustedProxies,
}

impl<S, B> tower_service::Service<http::Request<B>> for ForwardedService<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let ext = req.extensions();
        let peer = ext
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .or_else(|| {
                ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|i| i.get_ref().remote_addr())
            });
        if let Some(peer) = peer {
            let forwarded: Vec<&str> = req
                .headers()
                .get_all(FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let client = self.trusted.client(peer.ip(), &forwarded);
            req.extensions_mut().insert(ClientAddr(client));
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted(cidrs: &[&str]) -> TrustedProxies {
        TrustedProxies::new(cidrs.iter().map(|c| c.parse().unwrap()).collect())
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.1.2.3")));
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::1")));
        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.1")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.1/8", "::/129", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let e = "10.0.0.1/8".parse::<Cidr>().unwrap_err();
        assert!(e.contains("10.0.0.0/8"), "{e}");
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let none = TrustedProxies::default();
        assert_eq!(
            none.client(ip("127.0.0.1"), &["203.0.113.5"]),
            ip("127.0.0.1")
        );
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(t.client(ip("192.0.2.1"), &["203.0.113.5"]), ip("192.0.2.1"));
    }

    #[test]
    fn trusted_hops_pass_the_address_on_their_left_along() {
        let t = trusted(&["10.0.0.0/8", "127.0.0.1"]);
        // portal (trusted) → API: the person's address.
        assert_eq!(
            t.client(ip("127.0.0.1"), &["203.0.113.5"]),
            ip("203.0.113.5")
        );
        // person → ingress (10.0.0.9) → portal: a spoofed left-most value is not believed.
        assert_eq!(
            t.client(ip("127.0.0.1"), &["198.51.100.66, 203.0.113.5", "10.0.0.9"]),
            ip("203.0.113.5")
        );
        // Nothing forwarded, or only proxies: the last proxy-known address.
        assert_eq!(t.client(ip("10.0.0.2"), &[]), ip("10.0.0.2"));
        assert_eq!(t.client(ip("10.0.0.2"), &["10.0.0.3"]), ip("10.0.0.3"));
        // Garbage stops the walk at the hop that sent it.
        assert_eq!(
            t.client(ip("10.0.0.2"), &["203.0.113.5, junk"]),
            ip("10.0.0.2")
        );
    }
}
