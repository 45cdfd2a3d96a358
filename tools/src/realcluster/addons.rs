//! What kubeadm (and so kind) installs into a new cluster, as the same objects: kube-proxy
//! as a DaemonSet on the host network in iptables mode, talking to the API server
//! directly (it cannot use the service address it programs), and CoreDNS as a
//! Deployment behind the `kube-dns` service at the cluster DNS address.

use super::{controlplane, CLUSTER_CIDR, CLUSTER_DOMAIN, DNS_SERVICE_IP};

/// kube-proxy: its service account bound to `system:node-proxier`, its configuration
/// and kubeconfig (the service-account token, the API server's real address), and
/// the DaemonSet.
pub fn kube_proxy(image: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata:
  name: kube-proxy
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: kubeadm:node-proxier
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:node-proxier
subjects:
  - kind: ServiceAccount
    name: kube-proxy
    namespace: kube-system
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: kube-proxy
  namespace: kube-system
data:
  config.conf: |
    apiVersion: kubeproxy.config.k8s.io/v1alpha1
    kind: KubeProxyConfiguration
    mode: iptables
    clusterCIDR: {CLUSTER_CIDR}
    clientConnection:
      kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
    metricsBindAddress: 127.0.0.1:10249
    conntrack:
      # The machine's conntrack table size is the machine's, not the cluster's.
      maxPerCore: 0
  kubeconfig.conf: |
    apiVersion: v1
    kind: Config
    clusters:
      - name: default
        cluster:
          server: {api}
          certificate-authority: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
    users:
      - name: default
        user:
          tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token
    contexts:
      - name: default
        context:
          cluster: default
          user: default
    current-context: default
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: kube-proxy
  namespace: kube-system
  labels:
    k8s-app: kube-proxy
spec:
  selector:
    matchLabels:
      k8s-app: kube-proxy
  template:
    metadata:
      labels:
        k8s-app: kube-proxy
    spec:
      hostNetwork: true
      priorityClassName: system-node-critical
      serviceAccountName: kube-proxy
      tolerations:
        - operator: Exists
      containers:
        - name: kube-proxy
          image: {image}
          imagePullPolicy: IfNotPresent
          command:
            - /usr/local/bin/kube-proxy
            - --config=/var/lib/kube-proxy/config.conf
            - --hostname-override=$(NODE_NAME)
          env:
            - name: NODE_NAME
              valueFrom:
                fieldRef:
                  fieldPath: spec.nodeName
          securityContext:
            privileged: true
          volumeMounts:
            - name: kube-proxy
              mountPath: /var/lib/kube-proxy
            - name: xtables-lock
              mountPath: /run/xtables.lock
            - name: lib-modules
              mountPath: /lib/modules
              readOnly: true
      volumes:
        - name: kube-proxy
          configMap:
            name: kube-proxy
        - name: xtables-lock
          hostPath:
            path: /run/xtables.lock
            type: FileOrCreate
        - name: lib-modules
          hostPath:
            path: /lib/modules
            type: DirectoryOrCreate
"#,
        api = controlplane::api_url(),
    )
}

/// CoreDNS answering the cluster domain from the API (its `kubernetes` plugin), as
/// kubeadm deploys it; names outside the cluster are not forwarded anywhere.
pub fn coredns(image: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata:
  name: coredns
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:coredns
rules:
  - apiGroups: [""]
    resources: ["endpoints", "services", "pods", "namespaces"]
    verbs: ["list", "watch"]
  - apiGroups: ["discovery.k8s.io"]
    resources: ["endpointslices"]
    verbs: ["list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: system:coredns
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:coredns
subjects:
  - kind: ServiceAccount
    name: coredns
    namespace: kube-system
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: coredns
  namespace: kube-system
data:
  Corefile: |
    .:53 {{
        errors
        health {{
            lameduck 5s
        }}
        ready
        kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
            ttl 30
        }}
        cache 30
        loadbalance
        reload
    }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  replicas: 1
  selector:
    matchLabels:
      k8s-app: kube-dns
  template:
    metadata:
      labels:
        k8s-app: kube-dns
    spec:
      priorityClassName: system-cluster-critical
      serviceAccountName: coredns
      dnsPolicy: Default
      tolerations:
        - operator: Exists
      containers:
        - name: coredns
          image: {image}
          imagePullPolicy: IfNotPresent
          args: ["-conf", "/etc/coredns/Corefile"]
          ports:
            - {{ name: dns, containerPort: 53, protocol: UDP }}
            - {{ name: dns-tcp, containerPort: 53, protocol: TCP }}
          readinessProbe:
            httpGet:
              path: /ready
              port: 8181
          livenessProbe:
            httpGet:
              path: /health
              port: 8080
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities:
              drop: ["ALL"]
              add: ["NET_BIND_SERVICE"]
          volumeMounts:
            - name: config
              mountPath: /etc/coredns
              readOnly: true
      volumes:
        - name: config
          configMap:
            name: coredns
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  clusterIP: {DNS_SERVICE_IP}
  selector:
    k8s-app: kube-dns
  ports:
    - {{ name: dns, port: 53, protocol: UDP }}
    - {{ name: dns-tcp, port: 53, protocol: TCP }}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_addons_are_valid_manifests_with_the_images_given() {
        for (text, image) in [
            (kube_proxy("reg/kube-proxy:v1"), "reg/kube-proxy:v1"),
            (coredns("reg/coredns:v1"), "reg/coredns:v1"),
        ] {
            let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
            let workload = docs
                .iter()
                .find(|d| d["kind"] == "DaemonSet" || d["kind"] == "Deployment")
                .unwrap();
            assert_eq!(
                workload["spec"]["template"]["spec"]["containers"][0]["image"],
                image
            );
        }
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&coredns("x")).unwrap();
        let svc = docs.iter().find(|d| d["kind"] == "Service").unwrap();
        assert_eq!(svc["spec"]["clusterIP"], DNS_SERVICE_IP.to_string());
        let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
        assert!(cm["data"]["Corefile"]
            .as_str()
            .unwrap()
            .contains("kubernetes cluster.local"));
    }
}
