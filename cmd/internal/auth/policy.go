package auth

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"

	"go.yaml.in/yaml/v3"

	"github.com/robib/robib/cmd/internal/pki"
	"github.com/robib/robib/volume"
)

// PolicyVersion is the version of the policy file format Parse reads.
const PolicyVersion = 1

// maxPolicy bounds a policy file.
const maxPolicy = 1 << 20

// policyFile is the policy file format, version 1 (YAML, or JSON, which
// YAML reads too):
//
//	version: 1
//	api:
//	  admin: [alice, ops-laptop]     # client certificate names
//	  read: [grafana]
//	tokens:                          # API tokens for scripts
//	  - name: nightly-report
//	    sha256: <hex SHA-256 of the token>   # robib token new prints it
//	    role: read                   # read or admin
//	volumes:                         # NBD attach rights (--nbd-tls-verify-peer)
//	  db: {rw: [db-host], ro: [reporting]}
//	  "*": {ro: [auditor]}           # every volume (rights add up)
//	deny: [lost-laptop, site4]       # revoked names: refused everywhere,
//	                                 # whatever else lists them
//
// Unknown keys are errors, so a misspelt right is never silently dropped.
type policyFile struct {
	Version int `yaml:"version"`
	API     struct {
		Admin []string `yaml:"admin"`
		Read  []string `yaml:"read"`
	} `yaml:"api"`
	Tokens []struct {
		Name   string `yaml:"name"`
		SHA256 string `yaml:"sha256"`
		Role   string `yaml:"role"`
	} `yaml:"tokens"`
	Volumes map[string]struct {
		RW []string `yaml:"rw"`
		RO []string `yaml:"ro"`
	} `yaml:"volumes"`
	Deny []string `yaml:"deny"`
}

// Parse reads a policy file's contents. Every error wraps
// ErrInvalidPolicy and says which entry is wrong.
func Parse(b []byte) (*Policy, error) {
	if len(b) > maxPolicy {
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrInvalidPolicy, len(b), maxPolicy)
	}
	var f policyFile
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%w: empty file (want at least \"version: %d\")", ErrInvalidPolicy, PolicyVersion)
		}
		return nil, fmt.Errorf("%w: %v", ErrInvalidPolicy, err)
	}
	var extra any
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: more than one document", ErrInvalidPolicy)
	}
	if f.Version != PolicyVersion {
		return nil, fmt.Errorf("%w: version %d, this robib reads version %d", ErrInvalidPolicy, f.Version, PolicyVersion)
	}
	p := &Policy{
		roles:   map[string]Role{},
		tokens:  map[[sha256.Size]byte]string{},
		tokRole: map[string]Role{},
		volumes: map[string]map[string]Access{},
		deny:    map[string]bool{},
		source:  "policy",
	}
	for _, n := range f.Deny {
		if !pki.ValidName(n) {
			return nil, fmt.Errorf("%w: deny: bad name %q", ErrInvalidPolicy, n)
		}
		p.deny[n] = true
	}
	for _, g := range []struct {
		key   string
		names []string
		role  Role
	}{{"api.admin", f.API.Admin, RoleAdmin}, {"api.read", f.API.Read, RoleRead}} {
		for _, n := range g.names {
			if !pki.ValidName(n) {
				return nil, fmt.Errorf("%w: %s: bad name %q", ErrInvalidPolicy, g.key, n)
			}
			if _, dup := p.roles[n]; dup {
				return nil, fmt.Errorf("%w: %s: %q is listed twice", ErrInvalidPolicy, g.key, n)
			}
			p.roles[n] = g.role
		}
	}
	for i, t := range f.Tokens {
		if !pki.ValidName(t.Name) {
			return nil, fmt.Errorf("%w: tokens[%d]: bad name %q", ErrInvalidPolicy, i, t.Name)
		}
		if _, dup := p.tokRole[t.Name]; dup {
			return nil, fmt.Errorf("%w: tokens[%d]: name %q is listed twice", ErrInvalidPolicy, i, t.Name)
		}
		if !hexRule.MatchString(t.SHA256) {
			return nil, fmt.Errorf("%w: tokens[%d] (%s): sha256 must be 64 lower-case hex digits (the token's SHA-256, not the token)", ErrInvalidPolicy, i, t.Name)
		}
		var h [sha256.Size]byte
		_, _ = hex.Decode(h[:], []byte(t.SHA256))
		if other, dup := p.tokens[h]; dup {
			return nil, fmt.Errorf("%w: tokens[%d] (%s): same token as %q", ErrInvalidPolicy, i, t.Name, other)
		}
		var r Role
		switch t.Role {
		case "read":
			r = RoleRead
		case "admin":
			r = RoleAdmin
		default:
			return nil, fmt.Errorf("%w: tokens[%d] (%s): role %q, want read or admin", ErrInvalidPolicy, i, t.Name, t.Role)
		}
		p.tokens[h] = t.Name
		p.tokRole[t.Name] = r
	}
	for vol, rights := range f.Volumes {
		if vol != AnyVolume && volume.ValidateName(vol) != nil {
			return nil, fmt.Errorf("%w: volumes: bad volume name %q", ErrInvalidPolicy, vol)
		}
		m := map[string]Access{}
		for _, g := range []struct {
			key   string
			names []string
			a     Access
		}{{"rw", rights.RW, AccessWrite}, {"ro", rights.RO, AccessRead}} {
			for _, n := range g.names {
				if !pki.ValidName(n) {
					return nil, fmt.Errorf("%w: volumes.%s.%s: bad name %q", ErrInvalidPolicy, vol, g.key, n)
				}
				if _, dup := m[n]; dup {
					return nil, fmt.Errorf("%w: volumes.%s: %q is listed twice", ErrInvalidPolicy, vol, n)
				}
				m[n] = g.a
			}
		}
		p.volumes[vol] = m
	}
	return p, nil
}
