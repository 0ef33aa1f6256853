package main

import (
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/robib/robib/cluster"
	"github.com/robib/robib/cmd/internal/config"
)

func newClusterCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "Inspect and change cluster membership",
		Args:  cobra.NoArgs, // an unknown subcommand is an error, not help
		RunE:  func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(newClusterStatusCmd(g), newClusterLeaveCmd(g), newClusterRemoveCmd(g), newClusterTransferCmd(g), newKeyringCmd(g))
	return cmd
}

// security is the SECURITY column: mtls with the certificate's expiry, or
// INSECURE (plaintext, no authentication), or "-" when the site did not
// answer.
func security(s cluster.SiteStatus) string {
	switch s.Security {
	case "":
		return "-"
	case "insecure":
		return "INSECURE"
	}
	if s.CertNotAfter != nil {
		return fmt.Sprintf("%s (cert until %s)", s.Security, s.CertNotAfter.UTC().Format("2006-01-02"))
	}
	return s.Security
}

// degraded is the DEGRADED column: the volumes whose copy at the site has
// damaged blocks and how many bytes, or "-".
func degraded(s cluster.SiteStatus) string {
	if len(s.Degraded) == 0 {
		return "-"
	}
	var parts []string
	for _, d := range s.Degraded {
		parts = append(parts, fmt.Sprintf("%s (%s)", d.Volume, config.FormatSize(d.DamagedBytes)))
	}
	return strings.Join(parts, ", ")
}

func newClusterStatusCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show sites, leader, Raft state and how far each site lags",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			st, err := c.ClusterStatus(cmd.Context())
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return printJSON(out, st)
			}
			leader := st.Leader
			if leader == "" {
				leader = "(none)"
			}
			clusterID := st.ClusterID
			if clusterID == "" {
				clusterID = "(not yet known)"
			}
			fmt.Fprintf(out, "cluster: %s   leader: %s   commit index: %d\n\n", clusterID, leader, st.CommitIndex)
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SITE\tSTATE\tSUFFRAGE\tGOSSIP\tAPPLIED\tCOMMIT\tLAG\tRAFT\tNBD\tAPI\tSECURITY\tDEGRADED")
			for _, s := range st.Sites {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\t%s\t%s\t%s\t%s\n", s.Name, s.State, suffrage(s), s.Gossip,
					s.AppliedIndex, s.CommitIndex, s.Lag, s.RaftAddr, s.NBDAddr, s.APIAddr, security(s), degraded(s))
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			for _, s := range st.Sites {
				if note := catchUpNote(s); note != "" {
					fmt.Fprintf(out, "%s: %s\n", s.Name, note)
				}
				for _, d := range s.Degraded {
					fmt.Fprintf(out, "%s: volume %s has %s damaged in %d ranges, served from other sites while it is rebuilt:",
						s.Name, d.Volume, config.FormatSize(d.DamagedBytes), d.Ranges)
					for _, r := range d.First {
						fmt.Fprintf(out, " [%d,+%d)", r.Offset, r.Length)
					}
					if d.Ranges > len(d.First) {
						fmt.Fprintf(out, " ...")
					}
					fmt.Fprintln(out)
				}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// catchUpNote describes a snapshot install running at the site ("" if
// none): "catching up: X of Y MiB, R MiB/s, ETA D" while the stored stream
// is restored, "catching up: receiving X MiB, R MiB/s" while the leader's
// stream arrives (its length is not known there). The rate is over the
// whole phase, on the site's own clock.
func catchUpNote(s cluster.SiteStatus) string {
	c := s.CatchUp
	if c == nil {
		return ""
	}
	mib := func(n int64) float64 { return float64(n) / (1 << 20) }
	rate := 0.0
	if el := time.Duration(c.ElapsedNanos); el > 0 {
		rate = float64(c.BytesDone) / el.Seconds()
	}
	if c.BytesTotal <= 0 {
		return fmt.Sprintf("catching up: %s %.1f MiB, %.1f MiB/s", c.Phase, mib(c.BytesDone), mib(int64(rate)))
	}
	eta := "unknown"
	if left := c.BytesTotal - c.BytesDone; rate > 0 && left >= 0 {
		eta = time.Duration(float64(left) / rate * float64(time.Second)).Round(time.Second).String()
	}
	return fmt.Sprintf("catching up: %.1f of %.1f MiB, %.1f MiB/s, ETA %s", mib(c.BytesDone), mib(c.BytesTotal), mib(int64(rate)), eta)
}

// suffrage says what a site may do in elections: voter, non-voter (a
// joining or wiped site catching up; promoted once caught up), or "-" when
// it is not in the Raft configuration. A fresh site takes no part in
// elections yet.
func suffrage(s cluster.SiteStatus) string {
	out := s.Suffrage
	switch out {
	case "":
		out = "-"
	case "non-voter":
		out = "non-voter (catching up)"
	}
	if s.Fresh {
		out += ", fresh"
	}
	return out
}

func newClusterLeaveCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "leave",
		Short: "Remove the site behind --api from the cluster (its data stays on disk)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			if err := c.Leave(cmd.Context()); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), "site left the cluster; stop its agent now")
			return nil
		},
	}
}

func newClusterRemoveCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "remove SITE",
		Short: "Remove a dead site from the cluster (an alive site must use leave)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			if err := c.RemoveSite(cmd.Context(), args[0]); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed site %s\n", args[0])
			return nil
		},
	}
}

func newClusterTransferCmd(g *globals) *cobra.Command {
	var to string
	cmd := &cobra.Command{
		Use:   "transfer-leadership [--to SITE]",
		Short: "Hand Raft leadership to another site",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			leader, err := c.TransferLeadership(cmd.Context(), to)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "leader is now %s\n", leader)
			return nil
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "site to lead (default: any other voter)")
	return cmd
}
