//! Choosing the next token: penalties (presence, frequency, repetition), then greedy or
//! temperature with top-k, top-p and min-p, from a generator seeded per request (the same seed and
//! logits give the same tokens, whatever else runs beside the request).

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Sampling parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); above 0 divides the logits before softmax.
    pub temperature: f32,
    /// Keep only the k most likely tokens (None: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p (None: all).
    pub top_p: Option<f32>,
    /// Keep only tokens at least this fraction as likely as the most likely one (None: all).
    pub min_p: Option<f32>,
    /// Subtracted from the logit of every token generated so far (OpenAI's
    /// `presence_penalty`, -2..=2).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (OpenAI's
    /// `frequency_penalty`, -2..=2).
    pub frequency_penalty: f32,
    /// Divides positive (multiplies negative) logits of tokens in the prompt or generated so
    /// far (transformers' `repetition_penalty`; 1 is off).
    pub repetition_penalty: f32,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks every value's range.
    ///
    /// # Errors
    /// [`Error::Request`] naming the parameter and the value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Request(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be a finite number ≥ 0, not {}",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return bad("top-k must be at least 1".into());
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return bad(format!("top-p must be in (0, 1], not {p}"));
        }
        if let Some(p) = self.min_p
            && !(0.0..=1.0).contains(&p)
        {
            return bad(format!("min-p must be in [0, 1], not {p}"));
        }
        for (name, v) in [
            ("presence penalty", self.presence_penalty),
            ("frequency penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], not {v}"));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition penalty must be a finite number > 0, not {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }

    fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }
}

/// A sampler: parameters, the random generator's state and the counts the penalties need.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Times each token was generated.
    generated: HashMap<u32, u32>,
    /// Tokens of the prompt (for the repetition penalty).
    prompt: Vec<u32>,
}

impl Sampler {
    /// Checks the parameters and seeds the generator.
    ///
    /// # Errors
    /// As [`SamplingParams::validate`].
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Sampler {
            params,
            rng,
            generated: HashMap::new(),
            prompt: Vec::new(),
        })
    }

    /// Records the prompt, which the repetition penalty counts as seen.
    pub fn set_prompt(&mut self, prompt: &[u32]) {
        if self.params.repetition_penalty != 1.0 {
            let mut p = prompt.to_vec();
            p.sort_unstable();
            p.dedup();
            self.prompt = p;
        }
    }

    /// Picks a token id from one position's logits, and counts it as generated.
    ///
    /// # Errors
    /// [`Error::Request`] for empty or NaN logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::Request("no logits to sample from".into()));
        }
        if logits.iter().any(|x| x.is_nan()) {
            return Err(Error::Request("the model produced NaN logits".into()));
        }
        let penalized;
        let logits = if self.params.has_penalties() {
            penalized = self.penalize(logits);
            &penalized[..]
        } else {
            logits
        };
        let t = if self.params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        *self.generated.entry(t).or_default() += 1;
        Ok(t)
    }

    fn penalize(&self, logits: &[f32]) -> Vec<f32> {
        let mut l = logits.to_vec();
        let p = &self.params;
        let rep = |x: &mut f32| {
            *x = if *x > 0.0 {
                *x / p.repetition_penalty
            } else {
                *x * p.repetition_penalty
            }
        };
        if p.repetition_penalty != 1.0 {
            for &t in &self.prompt {
                if !self.generated.contains_key(&t)
                    && let Some(x) = l.get_mut(t as usize)
                {
                    rep(x);
                }
            }
        }
        for (&t, &n) in &self.generated {
            if let Some(x) = l.get_mut(t as usize) {
                if p.repetition_penalty != 1.0 {
                    rep(x);
                }
                *x -= p.presence_penalty + p.frequency_penalty * n as f32;
            }
        }
        l
    }

    /// A random draw among the candidates left by top-k, top-p and min-p.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        // Candidates sorted by logit, largest first (ties: lower id first).
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let mut c: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if let Some(k) = self.params.top_k
            && k < c.len()
        {
            c.select_nth_unstable_by(k - 1, order);
            c.truncate(k);
        }
        c.sort_unstable_by(order);
        let t = self.params.temperature;
        let max = c[0].1 / t;
        let mut probs: Vec<f32> = c.iter().map(|&(_, l)| (l / t - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let mut keep = probs.len();
        if let Some(top_p) = self.params.top_p {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if let Some(min_p) = self.params.min_p {
            // probs[0] is the largest
            let floor = min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        probs.truncate(keep);
        let sum: f32 = probs.iter().sum();
        let r: f32 = self.rng.random::<f32>() * sum;
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return c[i].0;
            }
        }
        c[probs.len() - 1].0
    }
}

/// Index of the largest value; ties go to the lowest index.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sampler(temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn greedy_takes_the_largest_and_the_lowest_id_on_ties() {
        let mut s = sampler(0.0, None, None, 1);
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]).unwrap(), 1);
    }

    #[test]
    fn bad_parameters_and_nan_logits_are_errors() {
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                top_k: Some(0),
                ..Default::default()
            },
            SamplingParams {
                top_p: Some(0.0),
                ..Default::default()
            },
            SamplingParams {
                top_p: Some(1.5),
                ..Default::default()
            },
            SamplingParams {
                min_p: Some(-0.1),
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: 2.5,
                ..Default::default()
            },
            SamplingParams {
                frequency_penalty: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
        ] {
            assert!(Sampler::new(p).is_err());
        }
        assert!(
            sampler(1.0, None, None, 0)
                .sample(&[0.0, f32::NAN])
                .is_err()
        );
        assert!(sampler(1.0, None, None, 0).sample(&[]).is_err());
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // logits ln(1), ln(3): token 1 should come up about 75% of the time.
        let mut s = sampler(1.0, None, None, 7);
        let logits = [0.0f32, 3f32.ln()];
        let ones = (0..20_000)
            .filter(|_| s.sample(&logits).unwrap() == 1)
            .count();
        let frac = ones as f64 / 20_000.0;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let logits = [1.0f32, 0.9, 0.5];
        // frequency: token 0 at 1.0 - 0.06 after one pick, 1.0 - 0.12 < 0.9 after two
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.06,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.sample(&logits).unwrap(), 0);
        assert_eq!(s.sample(&logits).unwrap(), 0);
        assert_eq!(s.sample(&logits).unwrap(), 1, "0 is at 0.88 now, 1 at 0.9");
        // presence: once is enough
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.2,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.sample(&logits).unwrap(), 0);
        assert_eq!(s.sample(&logits).unwrap(), 1);
        // repetition counts the prompt: token 0 in the prompt is divided by 2
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        })
        .unwrap();
        s.set_prompt(&[0, 0]);
        assert_eq!(s.sample(&logits).unwrap(), 1);
        // a negative penalty draws a token back
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: -1.0,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.sample(&[0.5, 1.0]).unwrap(), 1);
        assert_eq!(s.sample(&[1.2, 1.0]).unwrap(), 1, "1 is at 2.0 now");
    }

    #[test]
    fn min_p_keeps_only_tokens_near_the_most_likely() {
        // probabilities about 0.66, 0.24, 0.09: min-p 0.3 leaves tokens 0 and 1
        let logits = [2.0f32, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            min_p: Some(0.3),
            seed: 3,
            ..Default::default()
        })
        .unwrap();
        let picks: Vec<u32> = (0..2000).map(|_| s.sample(&logits).unwrap()).collect();
        assert!(!picks.contains(&2));
        assert!(picks.contains(&1));
    }

    proptest! {
        #[test]
        fn same_seed_same_tokens(seed in any::<u64>(), logits in prop::collection::vec(-10f32..10.0, 1..50),
                                 t in 0.1f32..2.0, k in 1usize..60, p in 0.05f32..=1.0) {
            let mut a = sampler(t, Some(k), Some(p), seed);
            let mut b = sampler(t, Some(k), Some(p), seed);
            for _ in 0..8 {
                prop_assert_eq!(a.sample(&logits).unwrap(), b.sample(&logits).unwrap());
            }
        }

        #[test]
        fn top_k_and_top_p_only_pick_allowed_tokens(seed in any::<u64>(), logits in prop::collection::vec(-10f32..10.0, 1..50),
                                                    k in 1usize..10, p in 0.05f32..=1.0) {
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            let mut s = sampler(1.0, Some(k), None, seed);
            let allowed = &order[..k.min(order.len())];
            for _ in 0..8 {
                let t = s.sample(&logits).unwrap() as usize;
                prop_assert!(allowed.contains(&t));
            }
            // top-p: the kept set is the shortest prefix reaching p.
            let max = logits.iter().cloned().fold(f32::MIN, f32::max);
            let probs: Vec<f32> = order.iter().map(|&i| (logits[i] - max).exp()).collect();
            let sum: f32 = probs.iter().sum();
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                acc += q / sum;
                if acc >= p { keep = i + 1; break; }
            }
            let mut s = sampler(1.0, None, Some(p), seed);
            for _ in 0..8 {
                let t = s.sample(&logits).unwrap() as usize;
                // a rounding difference can move the boundary by one token
                prop_assert!(order[..(keep + 1).min(order.len())].contains(&t));
            }
        }
    }
}
