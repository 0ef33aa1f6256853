package main

import (
	"encoding/base64"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/robib/robib/cluster"
)

// newKeyringCmd is `robib cluster keyring`: the gossip encryption keys of
// every live site. Rotation is install NEW, use NEW, remove OLD; each step
// reaches every live site, and use is refused until all have the key.
func newKeyringCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "keyring",
		Short: "List and rotate the gossip encryption keys (install, use, remove)",
		Long: `The gossip between sites is encrypted with the cluster's gossip key. To rotate it:

  robib cluster keyring generate        # prints a new key
  robib cluster keyring install KEY     # every live site learns it
  robib cluster keyring use KEY         # every live site encrypts with it (refused until all have it)
  robib cluster keyring remove OLDKEY   # every live site forgets the old one

Keys are shown as fingerprints (the first 8 hex digits of their SHA-256), never in full.
Each site keeps its keyring in its data directory, so a restart keeps it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	var asJSON bool
	list := &cobra.Command{
		Use:   "list",
		Short: "Show every live site's gossip keys (fingerprints) and the one it uses",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			rep, err := c.Keyring(cmd.Context())
			if err != nil {
				return err
			}
			return printKeyring(cmd.OutOrStdout(), rep, asJSON)
		},
	}
	list.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	generate := &cobra.Command{
		Use:   "generate",
		Short: "Print a new random gossip key (base64, 32 bytes)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			key, err := cluster.GenerateGossipKey()
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), base64.StdEncoding.EncodeToString(key))
			return nil
		},
	}
	cmd.AddCommand(list, generate)
	for _, op := range []struct{ name, short string }{
		{"install", "Add KEY to every live site's keyring"},
		{"use", "Make KEY the key every live site encrypts with (it must be installed everywhere)"},
		{"remove", "Remove KEY from every live site's keyring (not while a site uses it)"},
	} {
		var asJSON bool
		sub := &cobra.Command{
			Use:   op.name + " KEY",
			Short: op.short,
			Args:  cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := g.client()
				if err != nil {
					return err
				}
				rep, err := c.ChangeKeyring(cmd.Context(), op.name, strings.TrimSpace(args[0]))
				if err != nil {
					return err
				}
				return printKeyring(cmd.OutOrStdout(), rep, asJSON)
			},
		}
		sub.Flags().BoolVar(&asJSON, "json", false, "print JSON")
		cmd.AddCommand(sub)
	}
	return cmd
}

func printKeyring(out io.Writer, rep cluster.KeyringReport, asJSON bool) error {
	if asJSON {
		return printJSON(out, rep)
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SITE\tPRIMARY\tKEYS\tERROR")
	for _, s := range rep.Sites {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", s.Site, s.Primary, strings.Join(s.Keys, ","), s.Error)
	}
	return tw.Flush()
}
