"""kube-proxy: ClusterIP Services to their ready endpoints with nftables (iptables only if nft is missing)."""
