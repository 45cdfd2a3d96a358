//! The real [`ProxyFactory`]: for each pod the agent hands over, the mesh side (its
//! workload, identity and certificate) and the three listeners, made where the
//! pod's [`SocketFactory`] makes sockets. The in-pod state manager decides when;
//! this decides how.

use std::sync::Arc;

use protocol::zds::WorkloadInfo;
use protocol::WorkloadUid;
use tracing::warn;

use super::seam::{BoxFuture, ProxyFactory, RunningProxy, SocketFactory, StartError};
use super::{PodContext, PodMesh, PodProxy, ProxyConfig};

impl RunningProxy for PodProxy {
    fn drain(self: Box<Self>) -> BoxFuture<()> {
        Box::pin(PodProxy::drain(*self))
    }
}

/// The real factory: the pod's mesh side and its three listeners.
pub struct PodProxyFactory {
    pub cfg: Arc<ProxyConfig>,
}

impl ProxyFactory for PodProxyFactory {
    fn start(
        &self,
        uid: WorkloadUid,
        info: WorkloadInfo,
        sockets: Arc<dyn SocketFactory>,
    ) -> BoxFuture<Result<Box<dyn RunningProxy>, StartError>> {
        let cfg = self.cfg.clone();
        Box::pin(async move {
            let mesh = match &cfg.mesh {
                Some(m) => Some(PodMesh::new(m.clone(), info.clone())),
                None => {
                    warn!(%uid, pod = %format!("{}/{}", info.namespace, info.name),
                          "PASSTHROUGH_ONLY: this pod's traffic is passed through in plaintext, without policy");
                    None
                }
            };
            if !cfg.ipv6 {
                // Dual-stack listeners are off: a routable IPv6 address would carry
                // traffic nothing captures.
                let addrs = sockets.ipv6_addresses().map_err(StartError::Addresses)?;
                if let Some(v6) = addrs
                    .into_iter()
                    .find(|a| protocol::routable(&std::net::IpAddr::V6(*a)))
                {
                    return Err(StartError::Ipv6Off(v6));
                }
            }
            let ctx = PodContext {
                uid,
                info,
                sockets,
                budget: super::budget::Budget::new(cfg.max_connections_per_pod),
                cfg,
                mesh,
            };
            let proxy = PodProxy::start(ctx).await.map_err(StartError::Sockets)?;
            Ok(Box::new(proxy) as Box<dyn RunningProxy>)
        })
    }
}
