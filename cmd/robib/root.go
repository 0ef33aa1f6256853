package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/robib/robib/cmd/internal/agent"
	"github.com/robib/robib/cmd/internal/api"
	"github.com/robib/robib/cmd/internal/config"
	"github.com/robib/robib/cmd/internal/netx"
	"github.com/robib/robib/cmd/internal/pki"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// globals holds the root's persistent flags (the CLI's settings, see
// config.ClientSettings), read when a client command runs.
type globals struct {
	flags *pflag.FlagSet
}

func newRootCmd() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:           "robib",
		Short:         "robib: real-time remote backup for block storage",
		Long:          "robib replicates block volumes across sites with Raft and serves them over NBD.",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version,
	}
	g.flags = root.PersistentFlags()
	config.RegisterClientFlags(g.flags)
	root.AddCommand(newAgentCmd(), newVolumeCmd(g), newClusterCmd(g), newCertCmd(), newTokenCmd())
	return root
}

// client is the admin API client the CLI's settings describe: https,
// checked against the cluster CA, when --tls-ca is given.
func (g *globals) client() (*api.Client, error) {
	c, err := config.LoadClient(g.flags)
	if err != nil {
		return nil, err
	}
	opts := api.ClientOptions{Token: c.Token}
	if c.TLSCA != "" {
		if opts.TLS, err = pki.ClientConfig(c.TLSCA, c.TLSCert, c.TLSKey); err != nil {
			return nil, err
		}
	}
	return api.NewClient(c.API, opts)
}

func newAgentCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run a robib site",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.Load(cmd.Flags())
			if err != nil {
				return err
			}
			log, err := newLogger(cfg)
			if err != nil {
				return err
			}
			a, err := agent.New(cfg, log, &netx.Network{})
			if err != nil {
				return err
			}
			return a.Run(cmd.Context())
		},
	}
	config.RegisterFlags(cmd.Flags())
	return cmd
}

func newLogger(cfg config.Config) (*slog.Logger, error) {
	lvl, err := config.ParseLevel(cfg.LogLevel)
	if err != nil {
		return nil, err
	}
	opts := &slog.HandlerOptions{Level: lvl}
	var h slog.Handler = slog.NewTextHandler(os.Stderr, opts)
	if cfg.LogFormat == "json" {
		h = slog.NewJSONHandler(os.Stderr, opts)
	}
	return slog.New(h).With("site", cfg.Name), nil
}

// usageError marks a bad command line.
// printJSON writes v to out as indented JSON (every --json output).
func printJSON(out io.Writer, v any) error {
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// report prints a command's summary (as JSON with asJSON, else by its
// print method) and returns failed unless ok: the end of verify and
// repair, whose exit code says whether all went well.
func report(out io.Writer, asJSON bool, sum interface{ print(io.Writer) }, ok bool, failed error) error {
	if asJSON {
		if err := printJSON(out, sum); err != nil {
			return err
		}
	} else {
		sum.print(out)
	}
	if !ok {
		return failed
	}
	return nil
}

func usageError(format string, args ...any) error {
	return fmt.Errorf("usage: "+format, args...)
}
