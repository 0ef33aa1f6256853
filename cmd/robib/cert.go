package main

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/robib/robib/cmd/internal/pki"
)

func newCertCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cert",
		Short: "Create the cluster CA and issue site and client certificates",
		Long: "Every link of a robib cluster is TLS with mutual authentication against one cluster CA.\n" +
			"`robib cert ca` creates it; `robib cert issue` gives each site and each client its certificate,\n" +
			"in the directory layout qemu, nbdinfo and nbd-client read (ca-cert.pem, server-*.pem or client-*.pem).\n" +
			"Renewing is issuing again into the same directory with --force: agents pick up the new files without a restart.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(newCertCACmd(), newCertIssueCmd())
	return cmd
}

func newCertCACmd() *cobra.Command {
	var out string
	var force bool
	cmd := &cobra.Command{
		Use:   "ca --out DIR [--force]",
		Short: "Create the cluster CA (ca-cert.pem, ca-key.pem) and the gossip key (gossip.key) in DIR",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return usageError("--out is required")
			}
			if err := pki.CreateCA(out, pki.CAOptions{Force: force}); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created the cluster CA in %s: %s, %s (keep it off the sites), %s (the cluster's gossip key)\n",
				out, pki.CACertFile, pki.CAKeyFile, pki.GossipKeyFile)
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "directory for the CA's files (required; created with mode 0700)")
	cmd.Flags().BoolVar(&force, "force", false, "overwrite an existing CA: every certificate it issued stops being trusted")
	return cmd
}

func newCertIssueCmd() *cobra.Command {
	var caDir, name, kind, out string
	var ips, dns []string
	var lifetime time.Duration
	var force bool
	cmd := &cobra.Command{
		Use:   "issue --ca DIR --name NAME --kind site|client [--ip IP]... [--dns NAME]... [--lifetime DUR] --out DIR [--force]",
		Short: "Issue a site's or a client's certificate from the CA in --ca into --out",
		Long: "Issues a certificate signed by the cluster CA, bound to NAME (CN and the URI robib://KIND/NAME).\n" +
			"--kind site: a site's certificate (its --name), which serves Raft, the API and NBD and dials the other sites;\n" +
			"  it lists the addresses it is reached at (--ip, --dns; at least one). --out gets ca-cert.pem, server-cert.pem,\n" +
			"  server-key.pem and gossip.key: the agent's --tls-ca, --tls-cert, --tls-key and --gossip-key.\n" +
			"--kind client: an NBD client's or a CLI user's. --out gets ca-cert.pem, client-cert.pem and client-key.pem\n" +
			"  (nbdinfo --tls-certificates=DIR, qemu tls-creds-x509,dir=DIR, robib --tls-ca/--tls-cert/--tls-key).",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			for _, f := range []struct{ flag, v string }{{"--ca", caDir}, {"--name", name}, {"--kind", kind}, {"--out", out}} {
				if f.v == "" {
					return usageError("%s is required", f.flag)
				}
			}
			k := pki.Kind(kind)
			if k != pki.KindSite && k != pki.KindClient {
				return usageError("--kind %q: want %s or %s", kind, pki.KindSite, pki.KindClient)
			}
			if !pki.ValidName(name) {
				return usageError("--name %q: 1-63 characters of letters, digits, '.', '_' or '-', starting with a letter or digit", name)
			}
			req := pki.IssueRequest{Name: name, Kind: k, DNS: dns, Lifetime: lifetime, OutDir: out, Force: force}
			for _, s := range ips {
				ip := net.ParseIP(s)
				if ip == nil {
					return usageError("--ip %q: not an IP address", s)
				}
				req.IPs = append(req.IPs, ip)
			}
			if lifetime < 0 {
				return usageError("--lifetime %v: negative", lifetime)
			}
			if k == pki.KindSite && len(ips)+len(dns) == 0 {
				return usageError("a site certificate needs --ip or --dns: the addresses other sites and clients reach it at")
			}
			if err := pki.Issue(caDir, req); err != nil {
				return err
			}
			certFile, files := pki.ClientCertFile, []string{pki.CACertFile, pki.ClientCertFile, pki.ClientKeyFile}
			if k == pki.KindSite {
				certFile, files = pki.ServerCertFile, []string{pki.CACertFile, pki.ServerCertFile, pki.ServerKeyFile, pki.GossipKeyFile}
			}
			until, err := notAfter(filepath.Join(out, certFile))
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "issued %s/%s, valid until %s, in %s: %s\n", k, name, until.UTC().Format(time.RFC3339), out, strings.Join(files, ", "))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&caDir, "ca", "", "the CA directory (robib cert ca --out)")
	f.StringVar(&name, "name", "", "site name (the agent's --name) or client name")
	f.StringVar(&kind, "kind", "", "site or client")
	f.StringSliceVar(&ips, "ip", nil, "an IP address the site is reached at (repeat, or comma-separated)")
	f.StringSliceVar(&dns, "dns", nil, "a DNS name the site is reached at (repeat, or comma-separated)")
	f.DurationVar(&lifetime, "lifetime", 0, "validity, e.g. 2160h (default: 8760h for a site, 2160h for a client; never past the CA's)")
	f.StringVar(&out, "out", "", "directory for the certificate's files (required; not the CA directory)")
	f.BoolVar(&force, "force", false, "overwrite existing files (renewal)")
	return cmd
}

// notAfter reads the expiry of the PEM certificate in path.
func notAfter(path string) (time.Time, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return time.Time{}, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return time.Time{}, fmt.Errorf("%s: not PEM", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return time.Time{}, fmt.Errorf("%s: %w", path, err)
	}
	return c.NotAfter, nil
}
